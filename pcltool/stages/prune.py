"""``pcltool prune``: the chosen branch as the plain backbone, proven equal to the branch, saved without code.

A single-branch candidate becomes a fresh instance of the registered backbone class (no multi-branch code in it)
holding the (mean or live) trunk, the chosen peer and its classifier. ``ensemble`` / ``mean-ensemble`` cannot
shrink to one branch: they are kept whole as an :class:`EnsembleTeacher`. Before anything is written the pruned
network must give the branch's logits on the whole validation split (max abs diff <= 1e-5, fp32, eval mode) and
have exactly the plain backbone's parameter count. Weights go to safetensors (loading runs no code) with a model
card (``model.json``) holding what is needed to rebuild and use them.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from pcltool.errors import UsageError, VerificationError
from pcltool.manifest import RunDir, atomic_path
from pcltool.stages.select import (
    count_flops,
    count_params,
    is_ensemble,
    load_run,
    parse_candidate,
    resolve_candidate,
    run_select,
)

PRUNED_DIR = "pruned"
WEIGHTS = "model.safetensors"
CARD = "model.json"
PARITY_ATOL = 1e-5


# --- rebuilding a pruned network ----------------------------------------------------------------------------------
def build_from_card(card: dict) -> nn.Module:
    """A freshly initialised network of the card's architecture (load the saved weights into it)."""
    from pcltool.models import EnsembleTeacher, PCLNetwork, create_backbone

    if card.get("kind") == "ensemble":
        net = PCLNetwork(card["arch"], card["num_classes"], card["num_peers"], card["in_channels"], ensemble=True)
        return EnsembleTeacher(net)
    return create_backbone(card["arch"], card["num_classes"], card["in_channels"])


def load_pruned(weights: Path, card: dict) -> nn.Module:
    """The pruned network from its safetensors file and card, in eval mode on the CPU."""
    from safetensors.torch import load_file

    model = build_from_card(card)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


def prune_candidate(loaded, candidate: str) -> nn.Module:
    """The standalone network of ``candidate`` (eval mode, on the run's device)."""
    from pcltool.models import EnsembleTeacher, PCLNetwork, extract_branch

    source, index = parse_candidate(candidate)
    net = loaded.network(source)
    if index is None:
        fresh = PCLNetwork(net.backbone, net.num_classes, net.num_peers, net.in_channels, ensemble=True)
        fresh.load_state_dict(net.state_dict(), strict=True)
        model = EnsembleTeacher(fresh)
    else:
        model = extract_branch(net, index)
    return model.to(loaded.device).eval()


# --- verification ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def exact_fp32(device: torch.device):
    """Plain fp32 kernels on CUDA (no TF32), so a parity figure measures the network, not the kernels."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def branch_parity(reference, model: nn.Module, split, view_maker, device, batch_size: int = 256) -> dict:
    """Max abs logit difference and top-1 agreement (%) between ``reference(x)`` and ``model(x)`` on ``split``."""
    worst = torch.zeros((), dtype=torch.float64, device=device)
    agree, count = 0, 0
    with exact_fp32(device):
        for images, _ in split.batches(batch_size, device):
            x = view_maker.eval_view(images)
            ref, out = reference(x).float(), model(x).float()
            diff = torch.nan_to_num((ref - out).abs().max().double(), nan=float("inf"))
            worst = torch.maximum(worst, diff)
            agree += int((ref.argmax(1) == out.argmax(1)).sum())
            count += x.shape[0]
    return {"max_abs_diff": worst.item(), "top1_agreement": 100.0 * agree / max(count, 1), "images": count}


def _serialized_bytes(model: nn.Module) -> int:
    from safetensors.torch import save

    return len(save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))


# --- the stage ------------------------------------------------------------------------------------------------------
def _candidate_for_prune(run: RunDir, peer: str, checkpoint: str, console) -> tuple[str, Path | None]:
    """The concrete candidate, and the select table when a policy chose it (``select`` runs first if needed)."""
    if peer not in ("best", "mean"):
        return resolve_candidate(run, peer), None
    record = run.stage("select")
    if record is None or record.get("status") != "done":
        run_select(run, checkpoint, console=console)
    elif record.get("params", {}).get("checkpoint") != checkpoint:
        chosen_on = record["params"].get("checkpoint")
        raise UsageError(f"--peer {peer}: select chose on the '{chosen_on}' checkpoint but prune was asked for "
                         f"'{checkpoint}'; pass --checkpoint {chosen_on} or re-run `pcltool select --checkpoint "
                         f"{checkpoint}`")
    return resolve_candidate(run, peer), run.artifact("select", "table")


def run_prune(run: RunDir, peer: str = "mean", checkpoint: str = "last", console=None) -> dict:
    """Prune candidate ``peer`` (a name or a policy) of ``run``'s ``checkpoint``; verify, save, record
    ``prune:<candidate>``. Returns the stage's metrics."""
    with run:
        candidate, select_table = _candidate_for_prune(run, peer, checkpoint, console)
        loaded = load_run(run, checkpoint)
        data, recipe = loaded.data, loaded.recipe
        source, index = parse_candidate(candidate)
        key = f"prune:{candidate}"
        inputs = {"checkpoint": loaded.checkpoint_path} | ({"select_table": select_table} if select_table else {})
        with run.running(key, params={"peer": peer, "candidate": candidate, "checkpoint": checkpoint},
                         inputs=inputs):
            model = prune_candidate(loaded, candidate)
            multi = loaded.network(source)
            input_size = [data.in_channels, data.image_size, data.image_size]
            card = {
                "arch": recipe.model.backbone, "num_classes": data.num_classes, "class_names": data.class_names,
                "in_channels": data.in_channels, "input_size": input_size, "mean": list(data.mean),
                "std": list(data.std), "candidate": candidate, "source": source, "run_id": run.run_id,
                "params": count_params(model), "flops": count_flops(model, input_size, loaded.device),
                "kind": "ensemble" if is_ensemble(candidate) else "single-branch", "num_peers": multi.num_peers,
                "checkpoint": checkpoint, "format": "safetensors",
            }
            parity = branch_parity(loaded.candidate_logits(candidate), model, data.val, loaded.view_maker,
                                   loaded.device)
            expected_params = count_params(build_from_card(card))
            failures = []
            if not parity["max_abs_diff"] <= PARITY_ATOL:
                failures.append(f"logits: max abs diff {parity['max_abs_diff']:.3g} > {PARITY_ATOL:g} against "
                                f"{candidate} inside the multi-branch network ({parity['images']} val images, "
                                f"top-1 agreement {parity['top1_agreement']:.2f} %)")
            if card["params"] != expected_params:
                failures.append(f"parameters: {card['params']} != {expected_params} of the plain "
                                f"{card['arch']}")
            if failures:
                raise VerificationError(f"pruned {candidate} failed verification:\n  - " + "\n  - ".join(failures))

            out_dir = run.path / PRUNED_DIR / candidate
            weights_path, card_path = out_dir / WEIGHTS, out_dir / CARD
            _write(model, card, weights_path, card_path)
            metrics = {
                "candidate": candidate, "source": source, "kind": card["kind"],
                "parity_max_abs_diff": parity["max_abs_diff"], "parity_top1_agreement": parity["top1_agreement"],
                "parity_images": parity["images"],
                "params": card["params"], "plain_params": expected_params, "flops": card["flops"],
                "bytes": weights_path.stat().st_size,
                "multi_branch_params": count_params(multi),
                "multi_branch_flops": count_flops(multi, input_size, loaded.device),
                "multi_branch_bytes": _serialized_bytes(multi),
            }
            run.finish(key, {"weights": weights_path, "card": card_path}, metrics)
    if console is not None:
        console.print(prune_view(metrics, card))
    return metrics


def _write(model: nn.Module, card: dict, weights_path: Path, card_path: Path) -> None:
    """Write weights and card; the weights are re-read and compared before either file appears."""
    from safetensors.torch import load_file, save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights_path) as tmp_weights, atomic_path(card_path) as tmp_card:
        save_file(state, str(tmp_weights), metadata={"pcltool.card": json.dumps(card)})
        reloaded = load_file(str(tmp_weights))
        if reloaded.keys() != state.keys() or any(not torch.equal(reloaded[k], v) for k, v in state.items()):
            raise VerificationError(f"{weights_path}: the saved weights do not read back identically")
        tmp_card.write_text(json.dumps(card, indent=2) + "\n")


def prune_view(metrics: dict, card: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    what = "ensemble teacher (kept whole)" if card["kind"] == "ensemble" else f"plain {card['arch']}"
    table = Table(title=f"prune {card['candidate']} ({card['source']} network)")
    for col in ("network", "params (M)", "MFLOPs", "size (MB)"):
        table.add_column(col, justify="left" if col == "network" else "right")
    table.add_row(f"multi-branch {card['source']} network ({card['num_peers']} peers)",
                  f"{metrics['multi_branch_params'] / 1e6:.3f}", f"{metrics['multi_branch_flops'] / 1e6:.1f}",
                  f"{metrics['multi_branch_bytes'] / 1e6:.2f}")
    table.add_row(f"pruned: {what}", f"{metrics['params'] / 1e6:.3f}", f"{metrics['flops'] / 1e6:.1f}",
                  f"{metrics['bytes'] / 1e6:.2f}")
    note = Text(f"parity on val ({metrics['parity_images']} images, fp32 eval): max |Δlogit| "
                f"{metrics['parity_max_abs_diff']:.3g} (<= {PARITY_ATOL:g}), top-1 agreement "
                f"{metrics['parity_top1_agreement']:.2f} %; params {metrics['params']} = plain "
                f"{metrics['plain_params']}")
    return Group(table, note)
