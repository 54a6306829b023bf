"""A trained model back from a training checkpoint, for evaluation and prediction.

Loading is weights-only (``torch.load(..., weights_only=True)``): a checkpoint is read as tensors
and plain containers, never by unpickling arbitrary objects. A file that is missing, cut short (a
copy or a save that stopped midway: a checkpoint's zip directory is written last) or not an im2vec
checkpoint is refused with one line (``UserError``), never loaded half.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

from im2vec.deep.encoder import ImageEncoder
from im2vec.errors import BadValue, NotFound, current_targets
from im2vec.eval.heldout import TrainedModel
from im2vec.wide.row_checkpoint import METADATA, ROW_SHARDS, is_sharded_checkpoint, read_sharded
from im2vec.wide.tag_vectors import TagVectorMap

GAMMA_FILE = "im2vec_gamma.json"  # in a DCP checkpoint folder: the tagging γ chosen after it was written
WRITTEN_BY = "a checkpoint written by train.py (outputs/train/<time>/checkpoints/last.ckpt)"


def check_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """Refuse, with one line, a checkpoint file that is missing, cut short or not a torch checkpoint (reads only
    the zip directory at the file's end, cheap whatever the file's size), or a checkpoint folder (DCP, written by
    the ranks of a sharded run) without its metadata, which DCP writes last."""
    path = Path(path)
    if path.is_dir():
        if not is_sharded_checkpoint(path):
            raise BadValue(f"{what}: {path} is a folder without {METADATA}: not a checkpoint, or one whose save did "
                           "not finish", f"give {WRITTEN_BY}")
        return path
    if not path.is_file():
        raise NotFound(f"{what}: no checkpoint at {path}", f"give {WRITTEN_BY}")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise BadValue(f"{what}: {path} is cut short or not a checkpoint ({e}; {path.stat().st_size:,} bytes)",
                       f"copy it again, or give {WRITTEN_BY}") from None
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        raise BadValue(f"{what}: {path} is a zip file but not a torch checkpoint", f"give {WRITTEN_BY}")
    return path


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """A training checkpoint's contents, weights-only; refused with one line when it cannot be."""
    path = check_checkpoint_file(path, what)
    try:
        if path.is_dir():  # every tensor whole, the table's rows in id order, as one device holds them
            ckpt = read_sharded(path, rank=0, world=1)
            ckpt.pop(ROW_SHARDS)
            ckpt = with_recorded_gamma(ckpt, path)
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BadValue(f"{what}: {path} refused by weights-only loading: {unpickling_reason(e)}",
                       f"give {WRITTEN_BY}; im2vec never unpickles arbitrary objects") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:  # a damaged record inside the zip
        raise BadValue(f"{what}: {path} cannot be read ({_first_line(e)})", f"copy it again, or give {WRITTEN_BY}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("im2vec"), dict) or "state_dict" not in ckpt:
        raise BadValue(f"{what}: {path} is not an im2vec training checkpoint (no 'im2vec' entry)", f"give {WRITTEN_BY}")
    return ckpt


def unpickling_reason(e: Exception) -> str:
    """The one line of torch's weights-only error that names what was refused."""
    for line in str(e).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(" Please use", 1)[0].strip()
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def load_model(path: str | os.PathLike) -> TrainedModel:
    path = Path(path)
    ckpt = read_checkpoint(path)
    meta, state = ckpt["im2vec"], ckpt["state_dict"]
    try:
        encoder = ImageEncoder(meta["encoder"]["trunk"], meta["encoder"]["dim"], weights=None,
                               project=meta["encoder"].get("project", True))
        encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
        table, log_counts = state["table.embedding.weight"].float(), state["table.log_counts"].float()
        tags, fingerprint = list(meta["tags"]), meta["fingerprint"]
        gamma = float(meta.get("gamma", meta["sampler"]["gamma"]))
        tag_map, tv = None, meta.get("tag_vectors")
        if tv:  # the tag vectors are r_t + A·w_t: the table given to Tagger and evaluation is those vectors
            sub = {k[len("tag_map."):]: v for k, v in state.items() if k.startswith("tag_map.")}
            tag_map = TagVectorMap.from_state(sub, len(tags), bool(tv["freeze"]), tv.get("path", ""))
            table = tag_map.full(table)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:  # an entry missing, or weights of another shape
        raise BadValue(f"checkpoint: {path} is incomplete or inconsistent ({type(e).__name__}: {_first_line(e)})",
                       f"give {WRITTEN_BY}") from None
    if table.shape[0] != len(tags):
        raise BadValue(f"checkpoint: {path} has {table.shape[0]:,} tag vectors for {len(tags):,} tags",
                       f"give {WRITTEN_BY}")
    encoder.eval()
    return TrainedModel(encoder=encoder, table=table, log_counts=log_counts, tags=tags, gamma=gamma,
                        image_size=meta.get("image_size"), fingerprint=fingerprint, path=str(path), tag_map=tag_map,
                        holdout_tags=list(meta.get("holdout_tags") or []), data=current_targets(meta.get("data")))


def set_gamma(path: str | os.PathLike, gamma: float) -> None:
    """Record ``gamma`` as a training checkpoint's tagging γ (written to a temporary file, then renamed)."""
    path = Path(path)
    if path.is_dir():  # a DCP folder is written once: the γ goes beside its files, read with them
        read_checkpoint(path)
        tmp = path / (GAMMA_FILE + ".tmp")
        tmp.write_text(json.dumps({"gamma": float(gamma)}))
        os.replace(tmp, path / GAMMA_FILE)
        return
    ckpt = read_checkpoint(path)
    ckpt["im2vec"]["gamma"] = float(gamma)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def with_recorded_gamma(ckpt: dict, path: str | os.PathLike) -> dict:
    """A DCP checkpoint folder's contents with the γ that ``set_gamma`` recorded beside them, if any."""
    recorded = Path(path) / GAMMA_FILE
    if recorded.is_file() and isinstance(ckpt.get("im2vec"), dict):
        ckpt["im2vec"]["gamma"] = float(json.loads(recorded.read_text())["gamma"])
    return ckpt


def check_resume(checkpoint: dict, num_tags: int, dim: int, fingerprint: str) -> dict:
    """A checkpoint to resume training from -> its im2vec metadata; refused in one line when it is not an im2vec
    checkpoint, or holds another table's shape or another vocabulary."""
    meta = checkpoint.get("im2vec")
    if meta is None:
        raise BadValue("ckpt_path: not an im2vec checkpoint (no 'im2vec' entry)", "resume from a checkpoint written by train.py")
    if (meta["num_tags"], meta["dim"]) != (num_tags, dim):
        raise BadValue(f"ckpt_path: the checkpoint has a {meta['num_tags']}×{meta['dim']} tag table, this run "
                       f"{num_tags}×{dim}", "resume with the vocabulary and model.dim it was trained with")
    if meta["fingerprint"] != fingerprint:
        raise BadValue("ckpt_path: the checkpoint was trained with another vocabulary (same size, other tags)",
                       "resume with the vocabulary file it was trained on")
    return meta
