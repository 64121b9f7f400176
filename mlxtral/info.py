"""``mlxtral info``: what a checkpoint is, without loading a backend.

Format, architecture, parameters in all and active per token, tensors per type (count, bytes),
context length, tokenizer and chat template, and the memory it needs to run (weights + KV cache).
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from mlxtral.wording import plural

_EXPERT = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight$")
MAX_CELL = 1000  # characters of one file-derived value in the table (a GGUF string can be 64 MB)


def active_weight_bytes(ckpt: Any) -> int:
    """Bytes of weights one decoded token reads: everything but the unused experts and the
    embedding table (only one row of it is read, unless it doubles as the output matrix)."""
    args = ckpt.args
    frac = args.n_experts_per_tok / args.n_experts if args.is_moe else 1.0
    total = 0.0
    for name, q in ckpt.tensors.items():
        if name == "token_embd.weight":
            total += q.nbytes if args.tie_word_embeddings else q.nbytes / q.shape[0]
        elif _EXPERT.match(name):
            total += q.nbytes * frac
        else:
            total += q.nbytes
    return int(total)


def _run_mode(ckpt: Any, backend: str, ctx: int, budget: str | int | None) -> dict[str, Any]:
    """How ``load`` would run this model here: resident, streaming experts, or refused."""
    from mlxtral.errors import MlxtralError
    from mlxtral.expert_cache import plan_memory

    try:
        plan = plan_memory(ckpt, backend, ctx, budget=budget)
    except MlxtralError as e:
        return {"mode": "refused", "reason": e.message}
    return {**plan.as_dict(), "summary": plan.describe()}


def describe(path: str | Path, max_context: int | None = None,
             experts_per_token: int | None = None, backend: str = "auto",
             memory_budget: str | int | None = None) -> dict[str, Any]:
    """A JSON-ready description of the checkpoint at ``path``."""
    from mlxtral.formats.detect import open_checkpoint
    from mlxtral.model import DEFAULT_MAX_CONTEXT

    ckpt = open_checkpoint(Path(path))
    ckpt.args = ckpt.args.with_experts_per_token(experts_per_token)
    a = ckpt.args
    total, active = a.param_counts()
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0, "params": 0})
    weight_bytes = 0
    for q in ckpt.tensors.values():
        d = by_type[q.qtype]
        d["tensors"] += 1
        d["bytes"] += q.nbytes
        n = 1
        for s in q.shape:
            n *= int(s)
        d["params"] += n
        weight_bytes += q.nbytes
    ctx = max_context or min(a.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    try:
        from mlxtral.memory import available_memory, estimate
        from mlxtral.model import resolve_backend

        be = resolve_backend(backend)
        est = estimate(ckpt, be, ctx)
        kv, need = est.kv_cache, est.total
        mem = {"backend": be, "weights": est.weights, "kv_cache": est.kv_cache, "working": est.working,
               "total": est.total, "available": available_memory()}
        mem["mode"] = _run_mode(ckpt, be, ctx, memory_budget)
    except ImportError:  # pragma: no cover - before mlxtral.memory existed
        kv = a.kv_cache_bytes(ctx, bytes_per_value=4)  # the NumPy backend keeps K/V in float32
        need = weight_bytes + kv
        mem = {"total": need}
    tok_info: dict[str, Any] = {"kind": None}
    if ckpt.tokenizer is not None:
        try:
            from mlxtral.tokenizer import check_tokenizer_fits, load_tokenizer, template_name

            tok = load_tokenizer(ckpt.tokenizer)
            check_tokenizer_fits(tok, a.vocab_size, ckpt.path)  # as mlxtral.load refuses it
            try:
                template: str | None = template_name(tok)
            except Exception:
                template = None
            tok_info = {"kind": tok.kind, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                        "eos_ids": sorted(tok.eos_ids), "chat_template": template,
                        "has_jinja_template": bool(tok.chat_template)}
        except Exception as e:  # the tokenizer's own error is shown, the rest still useful
            from mlxtral.address_space import out_of_memory

            if out_of_memory(e) is not None:  # not the tokenizer's fault: the command's one line
                raise
            tok_info = {"kind": ckpt.tokenizer.kind, "error": str(e) or type(e).__name__}
    md = ckpt.metadata or {}
    name = md.get("general.name") if isinstance(md.get("general.name"), str) else None
    return {
        "path": str(ckpt.path),
        "name": name or ckpt.path.name,
        "format": ckpt.format,
        "file_type": file_type_name(md.get("general.file_type")),
        "architecture": "mixtral (sparse MoE)" if a.is_moe else "llama (dense)",
        "config": a.to_dict(),
        "params_total": total,
        "params_active": active,
        "weight_bytes": weight_bytes,
        "active_bytes_per_token": active_weight_bytes(ckpt),
        "tensor_types": {k: dict(v) for k, v in sorted(by_type.items())},
        "context_length": a.max_position_embeddings,
        "max_context": ctx,
        "kv_cache_bytes": kv,
        "memory_needed_bytes": need,
        "memory": mem,
        "tokenizer": tok_info,
    }


def file_type_name(v: Any) -> str | None:
    """A GGUF's ``general.file_type`` as llama.cpp names it (``Q4_K_M``), or None."""
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 16:
        return None
    import gguf

    try:
        return gguf.LlamaFileType(v).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"unknown ({v})"


def _gb(n: float) -> str:
    from mlxtral.memory import size_text

    return size_text(n)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _cell(text: str) -> Any:
    """File-derived text (``general.name``, paths, a tokenizer's error) as a rich cell: never markup
    (``[red]`` stays text) and never terminal control (ESC, CSI, OSC, bidi overrides shown as
    ``\\x1b``...), cut at :data:`MAX_CELL` characters."""
    from rich.text import Text

    from mlxtral.display import term_safe

    return Text(term_safe(text, MAX_CELL))


def render(d: dict[str, Any]) -> Any:
    """Rich renderables for :func:`describe`'s result."""
    from rich.console import Group
    from rich.table import Table

    c = d["config"]
    t = Table(title=_cell(d["name"]), show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    moe = (f"{plural(c['n_experts'], 'expert')}, {c['n_experts_per_tok']} per token" if c["n_experts"]
           else "dense (one always-on FFN)")
    rows = [
        ("file", d["path"]),
        ("format", d["format"] + (f", file type {d['file_type']}" if d.get("file_type") else "")),
        ("architecture", d["architecture"]),
        ("layers / dim", f"{c['n_layers']} / {c['dim']}"),
        ("heads", f"{c['n_heads']} query, {c['n_kv_heads']} KV, head dim {c['head_dim']}"),
        ("FFN", f"hidden {c['hidden_dim']}; {moe}"),
        ("RoPE theta / norm eps", f"{c['rope_theta']:g} / {c['norm_eps']:g}"),
        ("vocabulary", str(c["vocab_size"])),
        ("parameters", f"{_count(d['params_total'])} in all, {_count(d['params_active'])} active per token"),
        ("weights", f"{_gb(d['weight_bytes'])}; {_gb(d['active_bytes_per_token'])} read per token"),
        ("context", f"{d['context_length']} (model); KV cache at {d['max_context']}: "
                    f"{_gb(d['kv_cache_bytes'])}"),
    ]
    m = d.get("memory", {})
    if "weights" in m:
        avail = f"; {_gb(m['available'])} available" if m.get("available") else ""
        rows.append(("memory to run", f"~{_gb(m['total'])} on {m['backend']}: weights {_gb(m['weights'])}"
                                      f" + KV cache {_gb(m['kv_cache'])} + working set "
                                      f"{_gb(m['working'])}{avail}"))
    else:
        rows.append(("memory to run", f"~{_gb(d['memory_needed_bytes'])} (weights + KV cache)"))
    mode = m.get("mode")
    if mode:
        rows.append(("runs here as", mode["summary"] if mode["mode"] != "refused"
                     else f"refused: {mode['reason']}"))
    tok = d["tokenizer"]
    if "error" in tok:
        rows.append(("tokenizer", f"{tok['kind']}: error: {tok['error']}"))
    elif tok.get("kind"):
        rows.append(("tokenizer", f"{tok['kind']}, {tok['vocab_size']} tokens, BOS {tok['bos_id']}, "
                                  f"end of turn {tok['eos_ids']}"))
        rows.append(("chat template", str(tok.get("chat_template") or "none")))
    else:
        rows.append(("tokenizer", "none found"))
    for k, v in rows:
        t.add_row(k, _cell(v))
    types = Table(title="tensors by type (experts one by one)", title_justify="left")
    types.add_column("type")
    types.add_column("tensors", justify="right")
    types.add_column("parameters", justify="right")
    types.add_column("bytes", justify="right")
    for k, v in d["tensor_types"].items():
        types.add_row(_cell(k), str(v["tensors"]), _count(v["params"]), _gb(v["bytes"]))
    return Group(t, types)
