"""llama.cpp pre-flight: llama-server's slot and KV layout (ctx-size, parallel, kv-unified), the
context a request needs, and the tokenizer check, used before any launch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from servetune.core.space import ChoiceParam, IntParam, Param
from servetune.core.study import ParamValue

_AUTO_SLOTS = 4
"""Slots llama-server uses when --parallel is -1 (auto); auto also forces kv-unified on, even
with --no-kv-unified. Sources: llama.cpp PR #16736 ("server : support unified cache across
slots": by default 4 slots over a unified KV cache), tools/server/server.cpp
"n_parallel is set to auto, using n_parallel = 4 and kv_unified = true"; measured with the
xllamacpp wheel 2026.10.11549 (``--parallel -1 --no-kv-unified`` logs ``kv_unified = 'true'``)."""

CTX_PAD = 256
"""llama.cpp pads the context and each non-unified slot's share up to a multiple of 256 cells.
Source: src/llama-context.cpp, ``cparams.n_ctx = GGML_PAD(cparams.n_ctx, 256)`` and
``n_ctx_seq = GGML_PAD(n_ctx / n_seq_max, 256)`` (ref. llama.cpp PR #17046)."""


def _pad(n: int) -> int:
    return -(-n // CTX_PAD) * CTX_PAD


@dataclass(frozen=True)
class SlotLayout:
    """How llama-server lays out its KV cache for one set of flags.

    ``slots``: requests decoded at once; ``kv_unified``: one KV buffer shared by every slot;
    ``n_ctx``: KV cells in total (tokens held by all slots together); ``n_ctx_slot``: the most
    tokens (prompt + output) one request may hold, as the server logs it
    (``load_model: initializing, n_slots = …, n_ctx_slot = …, kv_unified = …``).
    """

    slots: int
    kv_unified: bool
    n_ctx: int
    n_ctx_slot: int

    def max_in_flight(self, tokens_per_request: int) -> int:
        """How many requests of ``tokens_per_request`` tokens can be in flight at once without
        llama-server failing them (0 when one does not fit a slot)."""
        if tokens_per_request > self.n_ctx_slot:
            return 0
        if not self.kv_unified:
            return self.slots  # each slot owns its share; more requests wait in the queue
        return min(self.slots, self.n_ctx // tokens_per_request)


def slot_layout(
    ctx_size: int,
    parallel: int,
    kv_unified: bool | None,
    n_ctx_train: int | None,
    *,
    fit: bool = True,
) -> SlotLayout | None:
    """llama-server's slot and context layout for ``--ctx-size``, ``--parallel``,
    ``--kv-unified`` (None = unset) and the model's ``n_ctx_train``; None when it depends on an
    unknown ``n_ctx_train`` (ctx-size 0) or a value llama.cpp never runs.

    Rules (src/llama-context.cpp, tools/server/server-context.cpp; each checked against the real
    server in tests/integration/test_llamacpp_local.py):

    - parallel -1 (auto) = 4 slots and a unified KV cache, whatever --kv-unified says; an explicit
      parallel leaves kv-unified off unless it is set.
    - ctx-size 0 = the model's n_ctx_train for a unified buffer. Without one it depends on
      ``--fit`` (``fit``; on by default): with fit on, each slot gets n_ctx_train; with fit off,
      n_ctx_train is split across the slots (measured with xllamacpp 2026.10.11549 on a
      4096-token model: ``--parallel 3`` logs n_ctx_slot = 4096, with ``--fit off`` 1536; the
      wheel's llama.cpp logs "context size unset and KV cache not unified -> using %u for %u
      sequences" when it does so). Fit may lower an unset ctx-size further when device memory is
      short; that is not modelled.
    - n_ctx is padded up to a multiple of 256. Unified: every slot may use all n_ctx cells, the
      slots together at most n_ctx (beyond it the server answers "Context size has been
      exceeded." to every active request). Not unified: each slot gets
      pad256(n_ctx / slots) cells of its own and n_ctx becomes slots × that.
    - The server caps a slot at n_ctx_train ("the slot context … exceeds the training context of
      the model … - capping").
    """
    if parallel == -1:
        slots, unified = _AUTO_SLOTS, True
    elif parallel >= 1:
        slots, unified = parallel, bool(kv_unified)
    else:
        return None
    if ctx_size < 0:
        return None
    if ctx_size == 0:
        if not n_ctx_train:
            return None
        ctx_size = n_ctx_train * slots if fit and not unified else n_ctx_train
    n_ctx = _pad(ctx_size)
    if unified:
        seq = n_ctx
    else:
        seq = _pad(n_ctx // slots)
        n_ctx = seq * slots
    if n_ctx_train:
        seq = min(seq, n_ctx_train)
    return SlotLayout(slots=slots, kv_unified=unified, n_ctx=n_ctx, n_ctx_slot=seq)


def _as_int(v: object) -> int | None:
    """``v`` as an int when it is an integral number (not a bool), else None."""
    if v is None or isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return int(v) if int(v) == v else None


def _layout_text(
    flags: Mapping[str, ParamValue | None], layout: SlotLayout, n_ctx_train: int | None
) -> str:
    """The flags and what llama-server makes of them, for a reason line."""
    ctx = _as_int(flags.get("ctx-size"))
    parallel = _as_int(flags.get("parallel"))
    ctx_text = f"ctx-size {ctx}" + (f" (the model's {n_ctx_train})" if ctx == 0 else "")
    par_text = f"parallel {parallel}" + (" (auto = 4 slots)" if parallel == -1 else "")
    kv = "a unified KV cache" if layout.kv_unified else "a KV share per slot"
    return (
        f"{ctx_text}, {par_text} and {kv} give n_ctx {layout.n_ctx}, n_ctx_slot "
        f"{layout.n_ctx_slot} per request"
    )


def ctx_size_for(layout: SlotLayout, tokens_per_request: int, in_flight: int) -> int:
    """The smallest ctx-size that lets ``in_flight`` requests of ``tokens_per_request`` tokens run
    with ``layout``'s slots and KV mode (a multiple of 256)."""
    if layout.kv_unified:
        return _pad(max(1, in_flight) * tokens_per_request)
    return layout.slots * _pad(tokens_per_request)


def _ctx_values(param: Param | None) -> list[int]:
    """The ctx-size values a search-space param can take that bound its largest (ints only;
    an int range gives its high end)."""
    if isinstance(param, ChoiceParam):
        return [v for v in param.values if isinstance(v, int) and not isinstance(v, bool)]
    if isinstance(param, IntParam):
        return [param.high]
    return []


def _tokenizer_problem(path: Path) -> str | None:
    """Why ``path`` is not a loadable Hugging Face tokenizer (directory or tokenizer.json), as the
    end of a sentence starting with the path; None when ``tokenizers`` loads it."""
    fix = "point to a tokenizer directory or its tokenizer.json, or use null to count tokens with "
    fix += "the server"
    if path.is_dir():
        file = path / "tokenizer.json"
        if not file.is_file():
            return f"is a directory without tokenizer.json; {fix}"
    elif path.is_file():
        file = path
    else:
        return f"does not exist; {fix}"
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exception for unreadable or foreign JSON
        return f"is not a loadable tokenizer: tokenizers cannot read {file.name} ({e}); {fix}"
    return None
