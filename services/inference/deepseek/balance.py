"""Expert placement from observed load: replicate hot experts, spread load over EP ranks.

The default placement gives rank r the contiguous experts [r*E/ep, (r+1)*E/ep). With skewed
routing (some experts get many more tokens) the busiest rank bounds every MoE step. From the
per-expert token counts the engine exports (`DeepseekV3ForCausalLM.expert_load()`), `plan_placement`
gives each rank `E/ep + extra` expert slots: the hottest experts get extra replicas (greedily, the
one with the highest load per replica next), then replicas go to ranks longest-processing-time
first (heaviest replica to the least loaded rank with a free slot, never two replicas of one
expert on one rank). A token routed to a replicated expert is computed by replica `token % n`,
so load splits evenly and every rank agrees without communication.

The placement is applied at load time (each rank then reads exactly the experts it holds): write
it with `save_placement(folder, ...)` next to config.json and restart the group; live migration of
expert weights between ranks is not implemented.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

PLACEMENT_FILE = "expert_placement.json"


def contiguous(E: int, ep: int) -> list[list[int]]:
    per = E // ep
    return [list(range(r * per, (r + 1) * per)) for r in range(ep)]


def plan_placement(counts: list[float] | torch.Tensor, ep: int, extra: int = 1) -> list[list[int]]:
    """counts [E] -> experts held by each of ep ranks (E/ep + extra slots each)."""
    counts = [float(c) for c in counts]
    E = len(counts)
    if E % ep:
        raise ValueError(f"{E} experts do not divide over {ep} ranks")
    slots = E // ep + extra
    replicas = [1] * E
    for _ in range(ep * slots - E):                   # fill the spare slots with hot-expert replicas
        can = [i for i in range(E) if replicas[i] < ep]
        if not can:
            break
        e = max(can, key=lambda i: (counts[i] / replicas[i], -i))
        replicas[e] += 1
    items = sorted(((counts[e] / replicas[e], e) for e in range(E) for _ in range(replicas[e])),
                   key=lambda t: (-t[0], t[1]))
    load = [0.0] * ep
    held: list[list[int]] = [[] for _ in range(ep)]
    for w, e in items:
        free = [r for r in range(ep) if len(held[r]) < slots and e not in held[r]]
        r = min(free, key=lambda i: (load[i], i))
        held[r].append(e)
        load[r] += w
    return [sorted(h) for h in held]


def placement_from_load(expert_load: torch.Tensor, moe_layers: list[int], ep: int,
                        extra: int = 1) -> dict[int, list[list[int]]]:
    """model.expert_load() [moe layers, E] (rows in layer order) -> {layer: placement}."""
    return {layer: plan_placement(expert_load[j], ep, extra) for j, layer in enumerate(moe_layers)}


def rank_loads(counts: list[float] | torch.Tensor, placement: list[list[int]]) -> list[float]:
    """Tokens each rank computes under `placement` (replicas split an expert's tokens evenly)."""
    counts = [float(c) for c in counts]
    n = [0] * len(counts)
    for held in placement:
        for e in held:
            n[e] += 1
    return [sum(counts[e] / n[e] for e in held) for held in placement]


def max_over_mean(loads: list[float]) -> float:
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 1.0


def save_placement(folder: str | Path, per_layer: dict[int, list[list[int]]]) -> Path:
    path = Path(folder) / PLACEMENT_FILE
    path.write_text(json.dumps({"layers": {str(k): v for k, v in per_layer.items()}}, indent=1))
    return path


def load_placement(folder: str | Path | None, ep: int) -> dict[int, list[list[int]]]:
    """Per-layer placements for this ep size from `folder`, or {} (contiguous everywhere)."""
    if not folder:
        return {}
    path = Path(folder) / PLACEMENT_FILE
    if not path.is_file():
        return {}
    layers = json.loads(path.read_text())["layers"]
    out = {int(k): v for k, v in layers.items()}
    for k, v in out.items():
        if len(v) != ep:
            raise ValueError(f"{path}: layer {k} is placed over {len(v)} ranks, the group has {ep}")
    return out
