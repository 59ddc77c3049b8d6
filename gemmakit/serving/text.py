"""Generated token ids to text, piece by piece, cut at the first stop string."""

from __future__ import annotations

from collections.abc import Sequence

from gemmakit.tokenizer import Tokenizer


class TextStream:
    """The text of one answer as its tokens arrive (`add`), without a stop string or anything
    after it. Text that might be the start of a stop string is held back until it is known not
    to be; an incomplete UTF-8 character waits for its next bytes. The whole answer is decoded
    each time (as `commands.common.stream_text` does), so SentencePiece spaces come out right.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.vocab = tokenizer.vocab_size  # a model may embed more ids than have pieces
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""  # the text decoded so far
        self.sent = 0  # how much of it has been given out
        self.stopped = False  # a stop string was found: the answer ends there

    def add(self, token: int) -> str:
        """The new text that `token` makes safe to show ("" when none)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self._decode()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            return ""
        return self._update(text, final=False)

    def flush(self) -> str:
        """What is left to show once the answer has ended (bytes that never made a whole
        character show as U+FFFD, as `decode` gives them)."""
        return "" if self.stopped else self._update(self._decode(), final=True)

    def _decode(self) -> str:
        return self.tokenizer.decode([i for i in self.ids if i < self.vocab])

    def _update(self, text: str, final: bool) -> str:
        self.text = text
        longest = max((len(s) for s in self.stops), default=0)
        cut = self._first_stop(max(0, self.sent - longest + 1))
        if cut is not None:
            self.stopped = True
            return self._give(cut)
        return self._give(len(text) - (0 if final else self._held_back()))

    def _first_stop(self, start: int) -> int | None:
        found = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """The longest end of the text that begins some stop string."""
        for k in range(min(len(self.text), max((len(s) for s in self.stops), default=0)), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stops):
                return k
        return 0

    def _give(self, end: int) -> str:
        end = max(end, self.sent)
        out = self.text[self.sent : end]
        self.sent = end
        return out
