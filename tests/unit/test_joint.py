"""Joint training's stage pool: every stage draws from all domains' train tasks, in their own domains."""

from __future__ import annotations

from types import SimpleNamespace

from tau2cl.cl.strategies.base import build_strategy
from tau2cl.cl.strategies.joint import part_name
from tau2cl.cl.strategies.registry import STRATEGIES
from tau2cl.recipe.grpo_step import GRPOStep
from tau2cl.rl.optimization import draw_shard

ORDER = ["airline", "retail", "telecom"]


def _strategy(name: str):
    return build_strategy(SimpleNamespace(cl_algorithm=name, seed=0))


def test_joint_stages_train_on_every_domain_and_say_which_part_they_are():
    joint, sequential = _strategy("joint"), _strategy("sequential")
    assert [joint.training_domains(ORDER, i) for i in range(3)] == [ORDER] * 3
    assert [sequential.training_domains(ORDER, i) for i in range(3)] == [["airline"], ["retail"], ["telecom"]]
    assert joint.stage_name(ORDER, 1) == "airline+retail+telecom"
    assert sequential.stage_name(ORDER, 1) == "retail"
    assert part_name(ORDER, 1) == "joint part 2/3"
    assert STRATEGIES["joint"].mixes_domains and not STRATEGIES["sequential"].mixes_domains


def _step(batch: int, world: int = 1, rank: int = 0, samples: int = 2):
    config = SimpleNamespace(seed=5, batch_size_per_gpu=batch, num_samples_per_prompt=samples)
    return SimpleNamespace(config=config, dist=SimpleNamespace(world_size=world, rank=rank))


def test_a_pool_of_two_domains_draws_tasks_of_both_each_in_its_own_domain(domains):
    pool = [domains["airline"], domains["retail"]]  # 2 train tasks each
    requests = GRPOStep.requests(_step(batch=4), 0, pool, step=1)
    assert len(requests) == 8  # 4 tasks x 2 samples
    drawn = {(r.domain.name, r.task.id) for r in requests}
    every = {(d.name, t.id) for d in pool for t in d.train_tasks}
    assert drawn == every  # a batch as large as the pool takes each task once
    for r in requests:
        assert r.task in r.domain.train_tasks
    assert [r.group for r in requests] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_a_one_domain_pool_draws_exactly_what_a_domain_alone_draws(domains):
    retail = domains["retail"]
    requests = GRPOStep.requests(_step(batch=1, world=2, rank=1), 3, [retail], step=2)
    index = draw_shard("5-3-2", range(len(retail.train_tasks)), 1, 2, 1)[0]
    assert [r.task.id for r in requests] == [retail.train_tasks[index].id] * 2


def test_ranks_split_a_mixed_pool_without_overlap(domains):
    pool = [domains["airline"], domains["retail"]]
    shards = [GRPOStep.requests(_step(batch=2, world=2, rank=r, samples=1), 0, pool, step=7) for r in (0, 1)]
    ids = [(q.domain.name, q.task.id) for shard in shards for q in shard]
    assert len(set(ids)) == 4
