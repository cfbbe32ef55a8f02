"""Training stages as LightningModules: a model, an objective, an optimizer and a schedule."""
