"""Built-in post-training tasks cut from the Shakespeare plays: no download, no labelling, fully offline.

Every scene is a sequence of speeches; the task is "answer a speech with the next one":

* SFT: prompt = one speech as `SPEAKER: text`, response = the next speech of the scene, `SPEAKER2: text`.
* Preference: the same pairs, chosen = the real next speech, rejected = that speech with its words shuffled
  (same speaker, same words, same line layout: only the word order tells them apart), or with probability
  `p_random` a speech from elsewhere in the split under the same speaker name.
* Prompts (PPO/GRPO): the same prompts, with the real next speaker and speech as metadata.

Train pairs come from the train plays and val pairs from the held-out plays (`ShakespeareCorpus.val_plays`),
so validation never sees a line the model trained on. Plays are parsed once per process and cached.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lmforge.data.corpus import ShakespeareCorpus
from lmforge.errors import ConfigError, DataError

DEFAULT_VAL_PLAYS = ("tragedies/hamlet.md", "romances/the-tempest.md")
_SPEAKER = re.compile(r"^\*\*([^*]+?)\*\*\s*$")
# inline directions: `__\[Awaking]_`, `_Aside_`, `*Exeunt lords.*`, a stray `**`
_STAGE = re.compile(r"_*\\?\[[^\]\n]*\]_*|(?<!\w)_[^_\n]*_(?!\w)|\*[^*\n]+\*|^\*+$")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|])")


@dataclass(frozen=True)
class Speech:
    speaker: str
    text: str

    def render(self) -> str:
        """The form prompts and responses take: `HAMLET: To be, or not to be...`."""
        return f"{self.speaker}: {self.text}"


def _clean_lines(lines: Sequence[str]) -> list[str]:
    out = []
    for line in lines:
        line = _ESCAPE.sub(r"\1", _STAGE.sub("", line.strip())).strip()
        line = re.sub(r"\s{2,}", " ", line)
        if line:
            out.append(line)
    return out


def parse_play(text: str) -> list[list[Speech]]:
    """Scenes of a play (markdown), each a list of speeches in order. Headings start a new scene; stage
    directions are dropped; a paragraph without a speaker continues the current speech (it follows an
    inline stage direction); markdown line breaks become newlines."""
    scenes: list[list[Speech]] = [[]]
    speaker: str | None = None
    lines: list[str] = []

    def close() -> None:
        nonlocal speaker, lines
        body = _clean_lines(lines)
        if speaker is not None and body:
            scenes[-1].append(Speech(speaker, "\n".join(body)))
        speaker, lines = None, []

    for para in re.split(r"\n[ \t]*\n", text):
        rows = [r for r in para.split("\n") if r.strip()]
        if not rows:
            continue
        first, last = rows[0].strip(), rows[-1].strip()
        speakers = [_SPEAKER.match(r.strip()) for r in rows]
        if first.startswith("#"):
            close()
            if scenes[-1]:
                scenes.append([])
            continue
        if first[:1] in "_*" and last[-1:] in "_*" and not any(speakers):
            continue  # a stage direction between paragraphs: the speech (if any) may go on after it
        for row, m in zip(rows, speakers):
            if m is not None:
                close()
                speaker = " ".join(m.group(1).split())
            elif speaker is not None:
                lines.append(row)
    close()
    return [s for s in scenes if s]


@lru_cache(maxsize=8)
def _parsed(val_plays: tuple[str, ...]) -> dict[str, list[tuple[str, list[list[Speech]]]]]:
    corpus = ShakespeareCorpus(val_plays)
    return {
        split: [(d.name, parse_play(d.text)) for d in corpus.documents(split)] for split in ("train", "val")
    }


def shuffle_words(text: str, rng: random.Random) -> str:
    """`text` with its words permuted and the whitespace between them (spaces, line breaks) left in place.
    Returns `text` itself when no permutation can differ (fewer than two distinct words)."""
    parts = re.split(r"(\s+)", text)
    words = parts[0::2]
    if len(set(words)) < 2:
        return text
    shuffled = words[:]
    while shuffled == words:
        rng.shuffle(shuffled)
    parts[0::2] = shuffled
    return "".join(parts)


class ShakespeareTasks:
    """SFT / preference / prompt records from the plays (train plays → "train", held-out plays → "val").

    `max_chars`: pairs where either speech is longer are left out (keeps sequences short for small models);
    `min_chars`: likewise for very short speeches ("Ay.", "O!") that carry no signal.
    """

    def __init__(
        self, val_plays: Sequence[str] = DEFAULT_VAL_PLAYS, max_chars: int = 400, min_chars: int = 1
    ) -> None:
        if not isinstance(max_chars, int) or max_chars < 1:
            raise ConfigError(
                "data.source.max_chars",
                f"must be a positive integer, got {max_chars!r}",
                "set data.source.max_chars=400",
            )
        if not isinstance(min_chars, int) or not 0 <= min_chars <= max_chars:
            raise ConfigError(
                "data.source.min_chars",
                f"must be an integer in [0, max_chars={max_chars}], got {min_chars!r}",
                "set data.source.min_chars=1",
            )
        self.val_plays, self.max_chars, self.min_chars = tuple(val_plays), max_chars, min_chars

    def _fits(self, speech: Speech) -> bool:
        return self.min_chars <= len(speech.text) <= self.max_chars

    def pairs(self, split: str) -> list[tuple[Speech, Speech, dict[str, Any]]]:
        """(speech, next speech of the same scene, where) for every consecutive pair that fits."""
        if split not in ("train", "val"):
            raise ConfigError("split", f"unknown split {split!r}", "use train or val")
        out = []
        for play, scenes in _parsed(self.val_plays)[split]:
            for s, scene in enumerate(scenes):
                for i in range(len(scene) - 1):
                    if self._fits(scene[i]) and self._fits(scene[i + 1]):
                        out.append((scene[i], scene[i + 1], {"play": play, "scene": s, "speech": i}))
        if not out:
            raise DataError(
                f"no Shakespeare speech pair of {self.min_chars}..{self.max_chars} characters "
                f"in the {split} plays. "
                "Fix: raise data.source.max_chars or lower data.source.min_chars"
            )
        return out

    def sft_records(self, split: str) -> list[dict[str, Any]]:
        return [{"prompt": a.render(), "response": b.render()} for a, b, _ in self.pairs(split)]

    def preference_records(self, split: str, seed: int = 0, p_random: float = 0.0) -> list[dict[str, Any]]:
        """Chosen = the real next speech; rejected = its words shuffled, or (probability `p_random`) the text
        of a random other speech of the split under the same speaker. Pairs whose words cannot be reordered
        are skipped."""
        if not 0.0 <= p_random <= 1.0:
            raise ConfigError(
                "data.source.p_random", f"must be in [0, 1], got {p_random!r}", "set data.source.p_random=0.0"
            )
        pairs = self.pairs(split)
        rng = random.Random(
            f"{seed}:{split}"
        )  # str seeds are hashed deterministically (not with PYTHONHASHSEED)
        out = []
        for a, b, _ in pairs:
            if p_random > 0 and rng.random() < p_random:
                other = b
                while other.text == b.text and len(pairs) > 1:
                    other = pairs[rng.randrange(len(pairs))][1]
                rejected = Speech(b.speaker, other.text)
            else:
                rejected = Speech(b.speaker, shuffle_words(b.text, rng))
            if rejected.text != b.text:
                out.append({"prompt": a.render(), "chosen": b.render(), "rejected": rejected.render()})
        return out

    def prompt_records(self, split: str) -> list[dict[str, Any]]:
        """Prompts with metadata a reward can use: the real next speaker and speech, and where they are."""
        return [
            {"prompt": a.render(), "metadata": {"next_speaker": b.speaker, "reference": b.render(), **where}}
            for a, b, where in self.pairs(split)
        ]
