"""RetrievalQAEnv: gymnasium contract, determinism, disjoint splits, multi-hop questions, grading, expert."""

from __future__ import annotations

import importlib.util
import json

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import opd_agents  # noqa: F401 - registers the shipped envs
from environments.retrieval_qa import CORPUS_PATH, RetrievalQAEnv, extract_answer, load_world, normalize
from opd_agents.env.core import heldout_seeds
from opd_agents.env.parsers import PARSERS
from opd_agents.types import StopReason

TRAIN_SEEDS = list(range(200))
HELDOUT_SEEDS = heldout_seeds(200)


@pytest.fixture(scope="module")
def env() -> RetrievalQAEnv:
    return RetrievalQAEnv()


def all_questions() -> list:
    world = load_world()
    return world.questions["train"] + world.questions["heldout"]


def play_expert(env: RetrievalQAEnv, seed: int) -> tuple[float, dict, int, int]:
    """Returns the final reward and info, the number of turns and the number of failed tool calls."""
    env.reset(seed=seed)
    assert env.task is not None
    failed = 0
    for turns in range(1, env.limits.max_turns + 1):
        _, reward, terminated, truncated, info = env.step(env.expert_action(env.task, env.history))
        failed += sum(not r.ok for r in info["tool_results"])
        if terminated or truncated:
            return reward, info, turns, failed
    raise AssertionError("expert did not finish")


def test_check_env_passes_on_registered_env() -> None:
    made = gym.make("opd_agents/RetrievalQA-v0").unwrapped
    assert isinstance(made, RetrievalQAEnv)
    check_env(made, skip_render_check=True)
    assert [s["function"]["name"] for s in made.tool_schemas] == ["search", "open_document"]


def test_same_seed_same_task_and_seeds_vary(env: RetrievalQAEnv) -> None:
    other = RetrievalQAEnv(parser="react")
    for seed in TRAIN_SEEDS[:20] + HELDOUT_SEEDS[:20]:
        obs_a, info_a = env.reset(seed=seed)
        task_a = env.task
        obs_b, info_b = other.reset(seed=seed)
        assert obs_a == obs_b and info_a["task_id"] == info_b["task_id"]
        assert task_a == other.task
    prompts = set()
    for seed in TRAIN_SEEDS:
        env.reset(seed=seed)
        prompts.add(env.task.prompt)
    assert len(prompts) > 120  # 200 seeds over ~330 questions x 2 phrasings


def collect(env: RetrievalQAEnv, seeds: list[int]) -> tuple[set[str], set[str], set[str]]:
    questions, keys, anchors = set(), set(), set()
    for seed in seeds:
        _, info = env.reset(seed=seed)
        assert info["split"] == env.task.split
        questions.add(env.task.data["question"])
        keys.add(env.task.data["key"])
        anchors.add(env.task.data["hops"][0]["doc_id"])
    return questions, keys, anchors


def test_heldout_questions_disjoint_from_train(env: RetrievalQAEnv) -> None:
    env.reset(seed=HELDOUT_SEEDS[0])
    assert env.task.split == "heldout"
    train, heldout = collect(env, TRAIN_SEEDS), collect(env, HELDOUT_SEEDS)
    for train_set, heldout_set in zip(train, heldout):
        assert train_set and heldout_set and not train_set & heldout_set
    world = load_world()
    assert {q.key for q in world.questions["train"]}.isdisjoint(q.key for q in world.questions["heldout"])
    assert len(world.questions["heldout"]) >= 50


def test_split_option_overrides_seed_and_unknown_split_fails(env: RetrievalQAEnv) -> None:
    _, info = env.reset(seed=3, options={"split": "heldout"})
    assert info["split"] == "heldout"
    assert env.task.data["key"] in {q.key for q in load_world().questions["heldout"]}
    with pytest.raises(ValueError, match="unknown split 'test'"):
        env.reset(seed=3, options={"split": "test"})


def test_offers_two_and_three_hop_questions() -> None:
    for split, questions in load_world().questions.items():
        assert {len(q.docs) for q in questions} == {2, 3}, split


def test_questions_need_every_document_on_their_chain() -> None:
    for q in all_questions():
        answer = f" {normalize(q.answer)} "
        first, last = q.docs[0], q.docs[-1]
        assert answer not in f" {normalize(first.title + ' ' + first.text)} ", q.key
        assert answer not in f" {normalize(q.template.phrasings[0])} "
        assert answer in f" {normalize(last.text)} ", q.key  # the last hop states it
        assert len({d.id for d in q.docs}) == len(q.docs) >= 2


def test_each_hop_query_ranks_its_document_first() -> None:
    index = load_world().index
    for q in all_questions():
        for d in q.docs:
            assert index.rank(d.title, 1)[0].id == d.id, (q.key, d.title)


def test_reference_lists_the_chain_with_doc_ids(env: RetrievalQAEnv) -> None:
    env.reset(seed=11)
    task = env.task
    for hop in task.data["hops"]:
        assert f"[{hop['doc_id']}]" in task.reference
    assert task.reference.splitlines()[-1] == f"Answer: {task.answer}"
    assert task.data["question"] in task.prompt and "Answer: <answer>" in task.prompt


@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_expert_solves_every_seed(parser: str) -> None:
    env = RetrievalQAEnv(parser=parser)
    for seed in TRAIN_SEEDS[:20] + HELDOUT_SEEDS[:20]:
        reward, info, turns, failed = play_expert(env, seed)
        assert (reward, info["success"], info["stop_reason"]) == (1.0, True, StopReason.completed), (parser, seed)
        # Opens each document once (searching unless an earlier search already listed it), then answers.
        hops = len(env.task.data["hops"])
        opened = [m.content.split("]")[0] + "]" for m in env.history if m.name == "open_document"]
        assert opened == [f"[{h['doc_id']}]" for h in env.task.data["hops"]]
        assert hops + 1 <= turns <= 2 * hops + 1
        assert failed == 0


def test_expert_takes_over_a_partial_episode(env: RetrievalQAEnv) -> None:
    env.reset(seed=7)
    hop = env.task.data["hops"][0]
    env.step(env.parser.format_call("search", {"query": hop["query"], "k": 5}))  # a student's own search
    calls = env.parser.parse(env.expert_action(env.task, env.history)).calls
    assert [(c.name, c.arguments) for c in calls] == [("open_document", {"doc_id": hop["doc_id"]})]


def test_wrong_answer_grades_zero_and_ends_episode(env: RetrievalQAEnv) -> None:
    env.reset(seed=4)
    _, reward, terminated, truncated, info = env.step("Answer: Atlantis")
    assert (reward, terminated, truncated, info["success"]) == (0.0, True, False, False)


@pytest.mark.parametrize(("text", "score"), [
    ("Answer: Neizeth", 1.0),
    ("I read both documents.\nFinal Answer: the Neizeth.", 1.0),
    ("**Answer:** NEIZETH", 1.0),
    ("Answer:\nNeizeth", 1.0),
    ("Answer: Kyzuia\nWait.\nAnswer: Neizeth", 1.0),  # the last Answer: counts
    ("It flows through the town.\nNeizeth", 1.0),  # no marker: the last line is the answer line
    ("Answer: Neizeth\nAnswer: Kyzuia", 0.0),
    ("Answer: Neizeth or Kyzuia", 0.0),
    ("The river is Neizeth, I think.", 0.0),
    ("", 0.0),
])
def test_grade_normalized_exact_match(env: RetrievalQAEnv, text: str, score: float) -> None:
    env.reset(seed=0)
    task = env.task.model_copy(update={"answer": "Neizeth"})
    assert env.grade(task, text) == score


def test_extract_and_normalize() -> None:
    assert extract_answer("x\nAnswer: The Wool Blankets!\nthanks") == "The Wool Blankets!"
    assert normalize("  The  Wool-Blankets! ") == "wool blankets"


def test_make_corpus_reproduces_the_committed_file() -> None:
    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS_PATH.with_name("make_corpus.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = [json.loads(line) for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines()]
    assert module.build_corpus() == committed
    assert module.build_corpus(seed=1) != committed
