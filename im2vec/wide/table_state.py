"""The tag head's part of a training checkpoint: the table and its optimizer state, either as each rank holds them
(a DCP folder that every rank writes its own rows to: im2vec/wide/row_checkpoint.py) or as one device would write
them (assembled on rank 0 when sharded); each rank takes its rows back on load, for any world size; and every
rank's sampler stream, so that a resumed run draws what the uninterrupted run would have drawn. The table
optimizer's state is kept out of Lightning's restore (which moves every state tensor to the trunk's device) and
put back in host memory when training starts."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from im2vec.wide.allocator import empty_hugepages
from im2vec.wide.row_checkpoint import ROW_SHARDS, SavedRows, read_rows
from im2vec.wide.sharded_table import ROW_STATE, assemble_rows, map_row_state, rank_seed, shard_of

TABLE_KEY = "table.embedding.weight"  # where the LightningModule registers the table's rows
TABLE_OPTIMIZER = 1  # the table optimizer's place in the checkpoint's optimizer_states (the trunk's is 0)


class TableStateMixin:
    """Checkpoint save and load for ``TagHead`` (needs its ``table``, ``sharded``, ``gen`` and ``seed``)."""

    def save_state(self, checkpoint: dict, per_rank: bool = False) -> dict:
        """Make ``checkpoint`` hold the table and its optimizer state -> the sampler streams and torch RNGs of every
        rank, for the checkpoint's metadata. Sharded, every rank calls this: with ``per_rank`` (every rank writes
        its own part, im2vec/wide/row_checkpoint.py) each keeps its own rows and names them in ``ROW_SHARDS``;
        without, the whole table and state are assembled on rank 0."""
        rngs = [(self.gen.get_state(), torch.get_rng_state())]
        if self.sharded:
            t = self.table
            opt = checkpoint["optimizer_states"][TABLE_OPTIMIZER]
            if per_rank:
                keys = [f"state_dict/{TABLE_KEY}"] + [f"optimizer_states/{TABLE_OPTIMIZER}/state/{pid}/{k}"
                                                      for pid, st in opt["state"].items() for k in st if k in ROW_STATE]
                checkpoint[ROW_SHARDS] = {"rank": t.rank, "world": t.world, "rows": t.num_tags, "keys": keys}
            else:
                checkpoint["state_dict"][TABLE_KEY] = t.assemble()
                opt["state"] = map_row_state(opt["state"],
                                             lambda v: assemble_rows(v, t.num_tags, t.rank, t.world, t.group))
            rngs = [None] * t.world
            dist.all_gather_object(rngs, (self.gen.get_state(), torch.get_rng_state()), group=t.group)
        return {"sampler_rng": rngs[0][0], "world_size": len(rngs),
                # every rank's sampler stream (seeded by (seed, rank)) and global torch RNG (dropout, stochastic depth)
                "sampler_rngs": [g for g, _ in rngs], "torch_rngs": [r for _, r in rngs]}

    def load_state(self, checkpoint: dict, meta: dict) -> None:
        """Take this rank's rows of the checkpoint's table and optimizer state (whatever world size wrote it),
        keep the optimizer state for ``restore_optimizer_state``, and continue the sampler streams (the same
        ranks) or start them anew from (seed, rank, step) (another world size)."""
        rank, world = (self.table.rank, self.table.world) if self.sharded else (0, 1)

        def mine(v):  # a file holds the whole tensor, a folder each rank's rows (read now: this rank's, any world)
            if isinstance(v, SavedRows):
                return read_rows(v, rank, world)
            return shard_of(v, rank, world) if self.sharded and isinstance(v, Tensor) else v

        sd = checkpoint.get("state_dict") or {}
        if TABLE_KEY in sd:  # (Lightning's checkpoints always have it; a hook called on its own may not)
            sd[TABLE_KEY] = mine(sd[TABLE_KEY])
        states = checkpoint.get("optimizer_states") or []
        if len(states) == 2:  # restored in restore_optimizer_state, on the CPU, this rank's rows
            opt = states[TABLE_OPTIMIZER]
            state = {pid: {k: mine(v) if k in ROW_STATE else v for k, v in st.items()} for pid, st in opt["state"].items()}
            self._table_opt_state = {"param_groups": opt["param_groups"], "state": state}
            states[TABLE_OPTIMIZER] = {"param_groups": opt["param_groups"], "state": {}}
        saved_world = int(meta.get("world_size", 1))
        if saved_world == world:  # the same ranks: every stream continues exactly
            self.gen.set_state(meta.get("sampler_rngs", [meta["sampler_rng"]])[rank])
            torch.set_rng_state(meta.get("torch_rngs", [meta["torch_rng"]])[rank])
        else:  # another world size: new streams, seeded by (seed, rank, step) — statistically equivalent
            step = int(checkpoint.get("global_step", 0))
            self.gen.manual_seed(rank_seed(self.seed, rank) + 7919 * step)
            torch.manual_seed(rank_seed(self.seed, rank) + 7919 * step + 1)
            if rank == 0:
                print(f"im2vec: resuming a {saved_world}-rank checkpoint on {world} rank(s): table and optimizer state "
                      "are exact; the samplers' and data streams start anew from (seed, rank, step)")

    def restore_optimizer_state(self, raw_opt) -> None:
        """The table optimizer's state read by ``load_state``, into ``raw_opt`` in host memory."""
        if self._table_opt_state is None:
            return
        raw_opt.load_state_dict(self._table_opt_state)
        self._table_opt_state = None
        for state in raw_opt.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor) and value.dim() > 0:
                    # an owned copy (the checkpoint is memory-mapped), where Linux may use huge pages
                    state[key] = empty_hugepages(like=value).copy_(value)
