"""Train order: deterministic per (seed, epoch), disjoint across ranks, and exactly resumable mid-epoch."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from lmforge.data.sampler import ResumableLoader, ResumableSampler, epoch_order
from lmforge.errors import DataError


class Indexed(Dataset):
    """Item i is just i, so a batch shows exactly which items it holds."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


def loader(n: int = 50, batch: int = 4, seed: int = 7, rank: int = 0, world: int = 1, fp: str = "data", **kw) -> ResumableLoader:
    return ResumableLoader(Indexed(n), ResumableSampler(n, seed=seed, rank=rank, world_size=world), batch, fingerprint=fp, **kw)


def take(it, k: int) -> list[list[int]]:
    return [next(it).tolist() for _ in range(k)]


def stream(dl: ResumableLoader):
    """Batches across epoch boundaries, as a training loop sees them."""
    while True:
        yield from dl


def epochs(dl: ResumableLoader, n_epochs: int) -> list[list[int]]:
    return [b.tolist() for _ in range(n_epochs) for b in dl]


def test_order_is_a_function_of_seed_and_epoch() -> None:
    a = epoch_order(100, seed=1, epoch=0)
    np.testing.assert_array_equal(a, epoch_order(100, seed=1, epoch=0))
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, epoch_order(100, seed=1, epoch=1))
    assert not np.array_equal(a, epoch_order(100, seed=2, epoch=0))
    np.testing.assert_array_equal(epoch_order(5, seed=1, epoch=3, shuffle=False), np.arange(5))
    assert epochs(loader(seed=3), 2) == epochs(loader(seed=3), 2)  # two runs, same batches


@pytest.mark.parametrize("n,world", [(48, 2), (50, 2), (50, 3), (7, 4)])
def test_ranks_get_disjoint_slices_covering_the_epoch(n: int, world: int) -> None:
    per_rank = [ResumableSampler(n, seed=5, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        slices = []
        for s in per_rank:
            s.set_epoch(epoch)
            slices.append(list(s))
        assert all(len(x) == n // world for x in slices)  # equal length: no rank waits on another
        seen = [i for x in slices for i in x]
        assert len(seen) == len(set(seen))  # disjoint
        assert set(seen) == set(epoch_order(n, 5, epoch)[: (n // world) * world].tolist())  # all but < world leftovers
        assert n - len(seen) < world


def test_two_rank_loaders_never_share_a_block() -> None:
    a, b = loader(n=40, rank=0, world=2), loader(n=40, rank=1, world=2)
    for _ in range(3):  # epochs
        ea, eb = [i for x in a for i in x.tolist()], [i for x in b for i in x.tolist()]
        assert not set(ea) & set(eb) and sorted(ea + eb) == list(range(40))


@pytest.mark.parametrize("k", [0, 1, 5, 12, 13, 20, 31])
def test_resume_after_k_batches_gives_the_same_next_batches(k: int) -> None:
    """12 batches per epoch (50 // 4): k=12 stops exactly at an epoch end, k>12 inside the second epoch."""
    reference = epochs(loader(), 3)
    run = loader()
    assert take(stream(run), k) == reference[:k]
    state = run.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    after = [b.tolist() for _ in range(3) for b in resumed]
    assert after[: len(reference) - k] == reference[k:]


def test_state_is_counted_in_the_main_process_with_workers() -> None:
    """Workers prefetch ahead of the training loop; the state must count only batches handed out."""
    reference = epochs(loader(), 1)
    run = loader(num_workers=2, prefetch_factor=4)
    it = iter(run)
    assert take(it, 3) == reference[:3]
    state = run.state_dict()
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == reference[3:]


def test_resume_refuses_other_data_or_seed() -> None:
    state = loader().state_dict()
    with pytest.raises(DataError, match="init_from"):
        loader(fp="other-data").load_state_dict(state)
    with pytest.raises(DataError, match="n_items|blocks"):
        loader(n=60).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        loader(seed=8).load_state_dict(state)


def test_resume_on_another_world_size_keeps_the_global_position(caplog) -> None:
    one = loader(n=48, batch=2)
    it = iter(one)
    consumed = [i for b in take(it, 6) for i in b]  # 12 samples of the global order
    assert consumed == epoch_order(48, 7, 0)[:12].tolist()
    two = [loader(n=48, batch=2, rank=r, world=2) for r in range(2)]
    with caplog.at_level("WARNING", logger="lmforge"):
        for dl in two:
            dl.load_state_dict(one.state_dict())
    rest = {i for dl in two for b in dl for i in b.tolist()}
    assert rest == set(epoch_order(48, 7, 0)[12:].tolist())  # exactly the samples not yet seen
    assert [r.getMessage()[:38] for r in caplog.records] == ["resuming with world_size=2 batch_size="]  # rank 0 says it, once


class Recorder(L.LightningModule):
    """Trains a scalar and records which items each step saw."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.tolist())
        return (self.w - batch.float().mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class IndexedData(L.LightningDataModule):
    def train_dataloader(self) -> ResumableLoader:
        return loader(n=30, batch=4)  # 7 batches per epoch


def fit(max_steps: int, ckpt_path: str | None = None, save_to: str | None = None) -> list[list[int]]:
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    module = Recorder()
    trainer.fit(module, datamodule=IndexedData(), ckpt_path=ckpt_path)
    if save_to:
        trainer.save_checkpoint(save_to)
    return module.seen


@pytest.mark.parametrize("k", [3, 7, 9])
def test_lightning_resume_mid_epoch_sees_the_uninterrupted_batches(tmp_path, k: int) -> None:
    """Through Lightning's own checkpoint protocol: fit k steps, save, fit again from the file."""
    full = fit(17)
    ckpt = str(tmp_path / "k.ckpt")
    assert fit(k, save_to=ckpt) == full[:k]
    assert torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["global_position"] == (k % 7 or 7) * 4
    assert fit(17, ckpt_path=ckpt) == full[k:]


def test_datamodule_shards_the_train_order_across_ranks(tmp_path) -> None:
    """The datamodule reads rank and world size from the trainer's strategy (DDP / FSDP data-parallel mesh)."""
    from types import SimpleNamespace

    from lmforge.data.corpus import Corpus, Document
    from lmforge.data.datamodule import PackedTextDataModule
    from lmforge.data.tokenizer import BPETokenizerSpec

    text = "the quick brown fox jumps over the lazy dog. " * 200
    corpus = Corpus({"train": [Document(str(i), text[i:]) for i in range(8)], "val": [Document("v", text[:500])]})
    tok = BPETokenizerSpec(vocab_size=300).train([text])
    seen = []
    for rank in range(2):
        dm = PackedTextDataModule(corpus, tok, block_size=8, batch_size=4, cache_dir=tmp_path, seed=3)
        dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        dm.setup("fit")
        loader = dm.train_dataloader()
        seen.append(list(loader.sampler))
        assert len(loader) == (len(dm.train_set) // 2) // 4
        assert next(iter(loader))["input_ids"].shape == (4, 8)
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == 2 * (len(dm.train_set) // 2)


def test_train_loaders_pin_their_batches_for_cuda_trainers_only(tmp_path) -> None:
    """Pinned batches are copied to the GPU without the host waiting for its queue; on CPU pinning is skipped."""
    from types import SimpleNamespace

    from lmforge.data.corpus import Corpus, Document
    from lmforge.data.datamodule import PackedTextDataModule
    from lmforge.data.sampler import pin_for
    from lmforge.data.tokenizer import BPETokenizerSpec

    def trainer(device: str) -> SimpleNamespace:
        return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), distributed_sampler_kwargs=None)

    assert pin_for(trainer("cuda")) and not pin_for(trainer("cpu")) and not pin_for(None)
    text = "the quick brown fox jumps over the lazy dog. " * 50
    corpus = Corpus({"train": [Document("t", text)], "val": [Document("v", text[:300])]})
    dm = PackedTextDataModule(corpus, BPETokenizerSpec(vocab_size=300).train([text]), block_size=8, batch_size=4, cache_dir=tmp_path)
    dm.setup("fit")
    for device, pinned in (("cpu", False), ("cuda", True)):
        dm.trainer = trainer(device)
        assert dm.train_dataloader().pin_memory is pinned
