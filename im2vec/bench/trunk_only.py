"""The training step without the tag head, for the benchmarks: the same module, loop and logging, with a head
that draws no ids, reads, sends and updates no rows, and whose loss is a trivial function of u. The difference
to the full step is what the head costs."""

from __future__ import annotations

from torch import Tensor

from im2vec.train.module import Im2VecModule
from im2vec.wide.tag_head import Prepared, TagHead


class TrunkOnlyHead(TagHead):
    @property
    def variant(self) -> str:
        return "serial"  # nothing queued on the worker: the table optimizer steps itself (with no gradient)

    def prepare(self, tags: Tensor, device) -> Prepared:
        self.device = device
        return Prepared(tags)

    def loss(self, u: Tensor, prep: Prepared) -> tuple[Tensor, Tensor, Tensor]:
        loss = u.float().square().mean()
        zero = loss.detach() * 0
        return loss, zero, zero


class TrunkOnly(Im2VecModule):
    head_class = TrunkOnlyHead
