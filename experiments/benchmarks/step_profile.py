r"""Where the time of a compiled training step goes, from a ``jax.profiler`` trace on CPU.

:func:`profile_step` traces a few calls of a compiled step and prints the share of the
machine's capacity (wall time x cores) that each kind of operation took:

- every event of the trace that names an HLO instruction (``hlo_op``; on CPU one event per
  thunk of XLA's thunk executor, on whichever thread ran it) is matched to the instruction of
  the optimised HLO (``compiled.as_text()``) of that name, and its duration goes to one
  category, read from the instruction and from what its fused computation contains;
- a fusion holding a convolution or a matrix product (``dot``) is that product: in a module
  named ``Conv*`` (``op_name`` metadata, which carries the Flax module path) it is a
  convolution's product, in the backward pass when its ``op_name`` has ``transpose(``
  (reverse mode transposes the JVP), and there a *kernel gradient* when it reduces over the
  pixels, else an *input gradient*: a convolution whose window is larger than its output
  image (the window runs over the activations), a product whose contraction is longer than
  the geometric mean of its result size (it sums over batch and pixels into a
  ``C_in x C_out`` matrix); a product with a constant matrix is a Winograd transform, counted
  as data movement; products outside ``Conv*`` modules (attention, dense layers)
  have their own row;
- other instructions of ``Conv*`` modules are the convolution's data movement (Winograd
  tile transforms, patches, padding), those of ``GroupNorm*`` modules normalisation, copies
  and transposes outside them layout copies, those of ``jax.random`` (``threefry``,
  ``_uniform``, ``_bernoulli`` in ``op_name``; a ``while`` loop's events include its body's)
  random numbers, the rest elementwise and other fusions (activations, residual sums, the
  loss, Adam);
- *idle* is what is left of the capacity: cores running no operation of the step (dispatch,
  waiting between dependent operations, or another process on a shared machine). The
  process CPU time over the same calls is printed beside it (CPU time below the summed
  operation time means operations were waiting or descheduled inside their events), and
  the time during which no operation of the step ran on any thread, and the mean number of
  operations running at once while any runs (1 means the step ran one operation at a time).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import pathlib
import re
import tempfile
import time

import jax
from jax.profiler import ProfileData

CATEGORIES = (
    "conv forward (products)",
    "conv backward, input gradient (products)",
    "conv backward, kernel gradient (products)",
    "conv data movement (tiles, patches, padding)",
    "GroupNorm (forward + backward)",
    "other products (attention, dense)",
    "layout copies and transposes",
    "random numbers (dropout masks, noise)",
    "elementwise and other fusions",
)
_PRODUCTS = ("convolution", "dot")
_STRUCTURAL = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple"}

_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_SHAPE = re.compile(r"^\w+\[([\d,]*)\]")
# The jitted internals of jax.random in op_name metadata.
_RANDOM = re.compile(r"threefry|random_bits|jit\(_(uniform|normal|bernoulli)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction of the optimised module: enough of it to classify."""

    name: str
    opcode: str
    dims: tuple[int, ...]
    text: str  # the rest of the line: operands and attributes
    op_name: str
    called: tuple[str, ...]


def parse_hlo(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """``(computations, entry)``: each computation's instructions by its name, and the
    entry computation's name, from HLO text."""
    computations: dict[str, list[Instruction]] = {}
    current, entry = None, ""
    for line in text.splitlines():
        if line.startswith("}"):
            current = None
        elif current is None and (match := _COMPUTATION.match(line)):
            current = match.group(1)
            computations[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None and (match := _INSTRUCTION.match(line)):
            name, shape, opcode, rest = match.groups()
            dims = _SHAPE.match(shape)
            op_name = re.search(r'op_name="([^"]*)"', rest)
            computations[current].append(
                Instruction(
                    name=name,
                    opcode=opcode,
                    dims=tuple(int(d) for d in dims.group(1).split(",") if d) if dims else (),
                    text=rest,
                    op_name=op_name.group(1) if op_name else "",
                    called=tuple(
                        re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", rest)
                    ),
                )
            )
    return computations, entry


def _reduces_over_pixels(product: Instruction, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether a backward product sums over batch and pixels (a kernel gradient)."""
    if product.opcode == "convolution":
        window = re.search(r"size=([\dx]+)", product.text)
        window_size = math.prod(int(d) for d in window.group(1).split("x")) if window else 1
        return window_size > math.prod(product.dims[1:-1])
    lhs = re.match(r"%([\w.\-]+)", product.text)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", product.text)
    lhs_dims = shapes.get(lhs.group(1), ()) if lhs else ()
    axes = [int(d) for d in contracting.group(1).split(",") if d] if contracting else []
    length = math.prod(lhs_dims[axis] for axis in axes if axis < len(lhs_dims))
    return length**2 > math.prod(product.dims)


def _module_kind(op_name: str) -> str:
    """The innermost ``Conv*`` or ``GroupNorm*`` Flax module in ``op_name``, if any."""
    modules = [part for part in op_name.split("/") if re.fullmatch(r"(Conv|GroupNorm)\w*", part)]
    return re.match(r"[A-Za-z]+", modules[-1]).group(0) if modules else ""


def classify(
    instruction: Instruction, computations: dict[str, list[Instruction]], entry: str
) -> str:
    """The category (an entry of :data:`CATEGORIES`) of an instruction of the ``entry``
    computation."""
    body, pending, seen = [], list(instruction.called), set()
    while pending:  # the instructions of every computation it calls, transitively
        name = pending.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        body.extend(computations[name])
        pending.extend(c for i in computations[name] for c in i.called)
    inner = [i for i in body if i.opcode not in _STRUCTURAL] or [instruction]
    products = [i for i in inner if i.opcode in _PRODUCTS]
    if instruction.opcode in _PRODUCTS:
        products = [instruction]
    if products:
        product = products[0]
        op_name = product.op_name or instruction.op_name
        if _module_kind(op_name) != "Conv":
            return CATEGORIES[5]
        if "transpose(" not in op_name:
            return CATEGORIES[0]
        known = {i.name: i for i in (*computations[entry], *body)}
        operands = re.findall(r"%([\w.\-]+)", product.text.split(")", 1)[0])
        if any(known[o].opcode == "constant" for o in operands if o in known):
            return CATEGORIES[3]  # a Winograd transform: a product with a constant matrix
        shapes = {name: i.dims for name, i in known.items()}
        return CATEGORIES[2] if _reduces_over_pixels(product, shapes) else CATEGORIES[1]
    op_name = instruction.op_name or next((i.op_name for i in inner if i.op_name), "")
    kinds = {_module_kind(i.op_name) for i in inner} | {_module_kind(op_name)}
    if "GroupNorm" in kinds:
        return CATEGORIES[4]
    if _module_kind(op_name) == "Conv":
        return CATEGORIES[3]
    if all(i.opcode in ("copy", "transpose") for i in inner):
        return CATEGORIES[6]
    if any(_RANDOM.search(i.op_name) for i in (instruction, *inner)):
        return CATEGORIES[7]
    return CATEGORIES[8]


@dataclasses.dataclass(frozen=True)
class OpEvent:
    """One execution of an HLO instruction in the trace."""

    name: str
    thread: str
    start_ns: float
    duration_ns: float


def op_events(xspace_path: str, module: str) -> list[OpEvent]:
    """Every trace event of ``module`` that names an HLO instruction (``hlo_op``)."""
    events = []
    for plane in ProfileData.from_file(xspace_path).planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats and stats.get("hlo_module") == module:
                    events.append(
                        OpEvent(stats["hlo_op"], line.name, event.start_ns, event.duration_ns)
                    )
    return events


def _union_ns(events: list[OpEvent]) -> float:
    total, end = 0.0, -math.inf
    for event in sorted(events, key=lambda e: e.start_ns):
        stop = event.start_ns + event.duration_ns
        if stop > end:
            total += stop - max(event.start_ns, end)
            end = stop
    return total


def _trace(one_step, calls: int) -> tuple[str, float, float]:
    """``(xspace_path, wall_s, cpu_s)`` of ``calls`` calls of ``one_step`` under the profiler."""
    folder = tempfile.mkdtemp(prefix="step_profile_")
    jax.profiler.start_trace(folder)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        jax.block_until_ready(one_step())
    wall_s, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    jax.profiler.stop_trace()
    return str(next(pathlib.Path(folder).rglob("*.xplane.pb"))), wall_s, cpu_s


def profile_step(compiled, one_step, calls: int = 3, top: int = 10) -> dict[str, float]:
    """Trace ``calls`` calls of ``one_step()`` (which calls ``compiled``, a
    ``jax.stages.Compiled``) and print the share of wall x cores per category (see the
    module docstring) and the ``top`` instructions by time. Returns the shares."""
    text = compiled.as_text()
    computations, entry = parse_hlo(text)
    module = re.match(r"HloModule ([\w.\-]+)", text).group(1)
    by_name = {i.name: i for i in computations[entry]}
    path, wall_s, cpu_s = _trace(one_step, calls)
    events = [e for e in op_events(path, module) if e.name in by_name]
    cores = len(os.sched_getaffinity(0))
    capacity_ns = wall_s * 1e9 * cores
    category_of = {name: classify(i, computations, entry) for name, i in by_name.items()}
    per_category = collections.Counter()
    per_op = collections.Counter()
    for event in events:
        per_category[category_of[event.name]] += event.duration_ns
        per_op[event.name] += event.duration_ns
    busy_ns = sum(per_category.values())
    shares = {c: per_category[c] / capacity_ns for c in CATEGORIES}
    shares["idle (no operation on a core)"] = max(0.0, 1.0 - busy_ns / capacity_ns)

    print(
        f"\nprofile of {calls} training steps: {1e3 * wall_s / calls:.0f} ms per step "
        f"(wall, traced), {cores} cores, {len(events) // calls} operations per step on "
        f"{len({e.thread for e in events})} threads"
    )
    print("| category | ms per step (summed over threads) | share of wall x cores |")
    print("|---|---:|---:|")
    for category, share in shares.items():
        ms_per_step = share * capacity_ns / 1e6 / calls
        print(f"| {category} | {ms_per_step:.1f} | {100 * share:.1f}% |")
    running_ns = _union_ns(events)
    print(
        f"process CPU time {100 * cpu_s / (wall_s * cores):.0f}% of wall x cores; no "
        f"operation on any thread {100 * (1 - running_ns / (wall_s * 1e9)):.0f}% of the wall "
        f"time; {busy_ns / running_ns:.2f} operations running at once on average while any "
        f"runs; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"\n| top {top} operations | category | ms per step | op_name |\n|---|---|---:|---|")
    for name, ns in per_op.most_common(top):
        op_name = by_name[name].op_name.replace("jit(", "").split(")/", 1)[-1]
        print(f"| {name} | {category_of[name]} | {ns / 1e6 / calls:.1f} | {op_name[-70:]} |")
    return shares
