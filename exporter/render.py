"""Exposition rendering that gives exactly the bytes of a prometheus_client encoder, faster.

Both of prometheus_client's encoders (the text format and OpenMetrics, with any
escaping) write a family as a header (HELP, TYPE, maybe UNIT) followed by one line
per sample: the sample's name and labels, escaped and sorted, a space,
floatToGoString(value) and a newline; OpenMetrics ends the body with '# EOF'.
Each line depends on its own sample only. Between two polls only the values
change, so LineEncoder asks the real encoder once for each family's header and,
once per series, for the text before the value (the prefix), keeps them, and
writes a body by joining strings. Profiled at a 100k-result window, the encoder
was 59% of a steady-state scrape, escaping and sorting labels per sample.

A family can come as Rows (keys and values, no Sample objects): the collector gives
its lab families so. The renderer learns only the rows it has not seen before (one
run of the encoder over a family holding just those rows), so a new lab host costs
its own 26 series, not a second look at the other 52,000.

It vouches only for what it checked: a family with anything else (timestamps,
exemplars, _created samples, a sample whose line does not come out as prefix +
value) goes through the real encoder as it is.

Backfill writes its OpenMetrics files with the same LineEncoder, each line with a
timestamp (`timestamped_starts`, `timestamped_lines`): the encoder is asked for
each series' line once, with a timestamp, and the line is checked whole (prefix,
value, timestamp) before its prefix is kept. So the server and backfill have one
writer of metric text: prometheus_client's, with its escaping and its numbers.
"""

from __future__ import annotations

import copy
import math
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from collections.abc import Callable, Hashable, Sequence

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

Encoder = Callable[[Any], bytes]
MAX_PREFIXES = 250_000  # sample prefixes kept per family kind (26 per lab host); cleared beyond
MAX_VALUES = 10_000  # formatted values kept
# Rows learnt from one run of the encoder. The first render at 2,000 lab hosts learns 62,000 series; in one run
# per family, its samples, label dicts, text and lines were held at once, and that was the exporter's peak.
LEARN_ROWS = 2_000
DEFAULT_ACCEPT = ""  # prometheus_client's default: the text format 0.0.4


# -- which encoding ----------------------------------------------------------------

@dataclass(frozen=True)
class Encoding:
    """An exposition format as answered: its Content-Type (which names it) and the encoder that writes it."""

    content_type: str
    encoder: Encoder = field(compare=False, repr=False)


_OPENMETRICS_VERSION = re.compile(r"^(application/openmetrics-text; version=)([^;]*)(;.*)$")


def choose_encoding(accept: str) -> Encoding:
    """The encoding for an Accept header, as prometheus_client's choose_encoder picks it, with two changes.

    - A version that is not a number (`text/plain; version=abc`) makes choose_encoder raise;
      it gets the default format instead of a dropped connection (docs/failure-modes.md, hostile input 9).
    - choose_encoder echoes any OpenMetrics version of 1.0.0 or later in the Content-Type
      (`version=1.19.0`); its encoder writes the same bytes for every 1.x, and for every 2.0 or
      later. The answer names the version written, 1.0.0 or 2.0.0, so the encodings are a
      closed set of 14, each rendered and cached once, whatever clients send (item 7).
    """
    try:
        _, content_type = choose_encoder(accept)
    except (TypeError, ValueError):  # parse_version gives str parts, compared with ints
        _, content_type = choose_encoder(DEFAULT_ACCEPT)
    match = _OPENMETRICS_VERSION.match(content_type)
    if match is not None:
        major = int(match.group(2).split(".", 1)[0])  # a number: a version >= 1.0.0 compared without raising
        written = "1.0.0" if major == 1 else "2.0.0"
        content_type = match.group(1) + written + match.group(3)
    return _encoding(content_type)


@lru_cache(maxsize=64)
def _encoding(content_type: str) -> Encoding:
    # Every Content-Type choose_encoding returns, sent back as an Accept header, picks itself.
    encoder, chosen = choose_encoder(content_type)
    assert chosen.startswith(content_type), (chosen, content_type)
    return Encoding(content_type, encoder)


# -- what is rendered -----------------------------------------------------------------

class _Families:
    """Families in the shape an encoder takes (anything with collect())."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


@dataclass(slots=True)
class Rows:
    """A family given as rows rather than samples.

    `family` is its header (name, type, help, unit; its samples are ignored); `keys` has one
    key per sample, unique in the family and the same in every render for the same series;
    `values` the samples' values in the same order; `sample(key)` names a key's sample (its
    name and labels), asked only for keys the renderer has not seen and when the family is
    built as a Metric (collect()).
    """

    family: Metric
    keys: Sequence[Hashable]
    values: Sequence[float]
    sample: Callable[[Hashable], tuple[str, dict[str, str]]]

    def metric(self, keys: Sequence[Hashable] | None = None, values: Sequence[float] | None = None,
               timestamp: int | None = None) -> Metric:
        """The family with its samples: every row, or only `keys` (with their `values`), each sample
        with `timestamp` if given."""
        family = copy.copy(self.family)
        family.samples = []
        for key, value in zip(self.keys if keys is None else keys, self.values if values is None else values):
            name, labels = self.sample(key)
            family.samples.append(Sample(name, labels, value, timestamp))
        return family


Part = Metric | Rows


def as_metric(part: Part) -> Metric:
    return part.metric() if isinstance(part, Rows) else part


class _NotPlain(Exception):
    """The encoder's output for a family is not header + prefix/value lines: use the encoder."""


class _NotConcatenable(Exception):
    """The encoder's output is not one piece per family and a trailer: use it for the whole body."""


class LineEncoder:
    """`encoder` for a list of families, with the encoder's own bytes, from kept pieces."""

    def __init__(self, encoder: Encoder) -> None:
        self._encoder = encoder
        self._trailer = encoder(_Families([])).decode()
        self._headers: dict[tuple[str, str, str, str], str] = {}
        self._prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}  # (name, labels) -> prefix
        self._values: dict[float, str] = {}
        self._row_prefixes: dict[str, dict[Hashable, str]] = {}  # family name -> row key -> prefix

    @property
    def series_known(self) -> int:
        """How many series' prefixes are kept (what the encoder has been asked for)."""
        return len(self._prefixes) + sum(map(len, self._row_prefixes.values()))

    def __call__(self, parts: Sequence[Part]) -> bytes:
        out: list[str] = []
        try:
            for part in parts:
                try:
                    self._write(out, part)
                except _NotPlain:
                    out.append(self._encode([as_metric(part)]))
        except _NotConcatenable:
            return self._encoder(_Families([as_metric(p) for p in parts]))
        out.append(self._trailer)
        return "".join(out).encode("utf-8")

    def _write(self, out: list[str], part: Part) -> None:
        """Appends the part's text to `out`, or raises _NotPlain (then `out` is as it was)."""
        if isinstance(part, Rows):
            header = self._header(part.family)
            prefixes = self._row_prefixes.setdefault(part.family.name, {})
            line_starts = self._line_starts_of(prefixes, part.keys, lambda missing: self._learn_rows(part, missing))
            values: Sequence[float] = part.values
        else:
            header = self._header(part)
            self._check_plain(part)
            keys = [(s.name, tuple(s.labels.items())) for s in part.samples]
            line_starts = self._line_starts_of(self._prefixes, keys, lambda missing: self._learn_samples(part, missing))
            values = [s.value for s in part.samples]
        out.append(header)
        self._lines(out, line_starts, values, "\n")

    def _lines(self, out: list[str], line_starts: Sequence[str], values: Sequence[float], end: str) -> None:
        """Appends each line: its start, its value as the encoder writes it, and `end`."""
        known = self._values.get
        text = self._text
        for start, value in zip(line_starts, values):
            # -0.0 finds 0's text in the table; a float zero takes the slow way, an int zero never has a sign
            written = known(value)
            if written is None or (not value and type(value) is float):
                written = text(value)
            out += (start, written, end)

    # -- lines with timestamps (backfill) ----------------------------------------

    def header(self, family: Metric) -> str:
        """The family's header (HELP, TYPE, maybe UNIT), as the encoder writes it."""
        return self._header(family)

    @property
    def trailer(self) -> str:
        """What the encoder ends a body with: `# EOF` in OpenMetrics, nothing in the text format."""
        return self._trailer

    def timestamped_starts(self, rows: Rows, timestamp: int) -> list[str]:
        """Each row's line up to its value, for lines that end with a timestamp. The rows not seen
        before are learnt from one run of the encoder over them, with `timestamp` on every sample,
        and each line is checked whole; rows whose lines come out otherwise raise ValueError."""
        prefixes = self._row_prefixes.setdefault(rows.family.name, {})
        try:
            return self._line_starts_of(prefixes, rows.keys,
                                        lambda missing: self._learn_rows(rows, missing, timestamp))
        except (_NotPlain, _NotConcatenable):
            raise ValueError(f"{rows.family.name}: the encoder does not write its samples as plain lines") from None

    def timestamped_lines(self, line_starts: Sequence[str], values: Sequence[float], timestamp: int) -> str:
        """The lines of `line_starts` (from timestamped_starts) with `values`, each ending with
        `timestamp`, as the encoder writes a sample that carries one."""
        out: list[str] = []
        self._lines(out, line_starts, values, f" {timestamp}\n")
        return "".join(out)

    @staticmethod
    def _line_starts_of(prefixes: dict[Any, str], keys: Sequence[Hashable],
                        learn: Callable[[list[int]], dict[Any, str]]) -> list[str]:
        """The kept prefix of every key; `learn(positions)` returns the prefixes of the keys at those
        positions, which are not kept yet, and keeps them. One pass over the keys: a render that meets
        no new series looks each up once, and one that does finds the few new ones by a scan for None."""
        starts: list[Any] = list(map(prefixes.get, keys))
        if None in starts:
            missing: list[int] = []
            try:
                while True:
                    missing.append(starts.index(None, missing[-1] + 1 if missing else 0))
            except ValueError:
                pass
            learnt = learn(missing)
            for position in missing:
                starts[position] = learnt[keys[position]]
        return starts

    def _learn_rows(self, rows: Rows, missing: list[int], timestamp: int | None = None) -> dict[Hashable, str]:
        """Learn the prefixes of the rows at `missing`, from one run of the encoder over them alone
        (their samples carrying `timestamp`, if given)."""
        prefixes = self._row_prefixes[rows.family.name]
        if len(prefixes) + len(missing) > MAX_PREFIXES:
            prefixes.clear()
        learnt: dict[Hashable, str] = {}
        for at in range(0, len(missing), LEARN_ROWS):  # a piece at a time: see LEARN_ROWS
            keys = [rows.keys[i] for i in missing[at:at + LEARN_ROWS]]
            family = rows.metric(keys, [rows.values[i] for i in missing[at:at + LEARN_ROWS]], timestamp)
            self._check_plain(family, timestamp)
            learnt.update(zip(keys, self._line_starts(family)))
        prefixes.update(learnt)
        return learnt

    def _learn_samples(self, family: Metric, missing: list[int]) -> dict[Any, str]:
        """The same for a family of samples: the encoder runs over the samples at `missing` alone."""
        if len(self._prefixes) + len(missing) > MAX_PREFIXES:
            self._prefixes.clear()
        unseen = copy.copy(family)
        unseen.samples = [family.samples[i] for i in missing]
        keys = [(s.name, tuple(s.labels.items())) for s in unseen.samples]
        learnt = dict(zip(keys, self._line_starts(unseen)))
        self._prefixes.update(learnt)
        return learnt

    @staticmethod
    def _check_plain(family: Metric, timestamp: int | None = None) -> None:
        """Raises _NotPlain unless every sample is a plain one of the family, with no timestamp but
        `timestamp` (an int: the encoder writes it as str() does)."""
        names = {family.name, family.name + "_total", family.name + "_bucket", family.name + "_count",
                 family.name + "_sum"}
        if timestamp is not None and type(timestamp) is not int:
            raise _NotPlain
        for s in family.samples:
            if s.name not in names or s.timestamp != timestamp or s.exemplar is not None \
                    or s.native_histogram is not None or s.value is None:
                raise _NotPlain

    def _line_starts(self, family: Metric) -> list[str]:
        """Each sample's line up to its value (name, labels and a space), from one run of the encoder."""
        text, header = self._encode([family]), self._header(family)
        lines = text[len(header):].split("\n")
        if not text.startswith(header) or lines[-1] != "" or len(lines) != len(family.samples) + 1:
            raise _NotPlain
        starts = []
        for sample, line in zip(family.samples, lines):
            value = " " + floatToGoString(sample.value) + ("" if sample.timestamp is None else f" {sample.timestamp}")
            if not line.endswith(value):
                raise _NotPlain
            # Interned: the encodings that write the same line share the string.
            starts.append(sys.intern(line[: -len(value)] + " "))
        return starts

    def _text(self, number: float) -> str:
        """floatToGoString(number), from a table of the values seen."""
        values = self._values
        text = values.get(number)
        if text is None or (number == 0 and math.copysign(1.0, number) < 0):  # -0.0 finds 0.0's text
            text = floatToGoString(number)
            if number == number and number != 0:  # NaN is never found again; zero has two signs
                if len(values) >= MAX_VALUES:
                    values.clear()
                values[number] = text
            elif number == 0 and text == "0.0":
                values[number] = text
        return text

    def _header(self, family: Metric) -> str:
        key = (family.name, family.type, family.documentation, family.unit)
        header = self._headers.get(key)
        if header is None:
            empty = copy.copy(family)
            empty.samples = []
            header = self._headers[key] = self._encode([empty])
        return header

    def _encode(self, families: list[Metric]) -> str:
        text = self._encoder(_Families(families)).decode("utf-8")
        if not text.endswith(self._trailer):
            raise _NotConcatenable
        return text[: len(text) - len(self._trailer)]
