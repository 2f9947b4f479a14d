"""RetrievalQA: multi-hop questions over a fictional encyclopedia, answered with search/open_document.

Each question follows a chain of relations from an anchor entity ("the founder of X" -> "born in T" ->
"T is in country N"), so the answer needs facts from two or three documents. The corpus
(``data/corpus.jsonl``, made by ``data/make_corpus.py``) is fictional, so prior knowledge does not help.

Split: held-out seeds draw questions about a different set of anchor entities (chosen by a stable hash of
the anchor's name) than training seeds, so no held-out question text ever appears in training.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from opd_agents.env.core import Task, ToolEnv
from opd_agents.env.tool import Tool
from opd_agents.types import Message
from tools.docs import Document, DocumentIndex, load_corpus

CORPUS_PATH = Path(__file__).parent / "data" / "corpus.jsonl"
HELDOUT_HASH_BELOW = 64  # anchors whose hash's first byte is below this (~25%) are held-out only


@dataclass(frozen=True)
class Template:
    name: str
    anchor_kind: str
    path: tuple[str, ...]  # facts keys (each holding a doc id) followed from the anchor
    target: str  # "title": the answer is the last entity's name; else a facts key of the last entity
    phrasings: tuple[str, ...]


TEMPLATES: tuple[Template, ...] = (
    Template("founder_town", "company", ("founder", "born_in"), "title", (
        "In which town was the founder of {x} born?",
        "Where was the person who founded {x} born? Name the town.")),
    Template("hq_river", "company", ("hq",), "river", (
        "Which river flows through the town where {x} is headquartered?",
        "{x} has its headquarters in a town on a river. Which river?")),
    Template("hq_country", "company", ("hq", "country"), "title", (
        "In which country is {x} headquartered?",
        "Which country is home to the headquarters of {x}?")),
    Template("hq_year", "company", ("hq",), "year", (
        "In which year was the town where {x} is headquartered founded?",
        "When was the headquarters town of {x} founded? Give the year.")),
    Template("founder_country", "company", ("founder", "born_in", "country"), "title", (
        "In which country was the founder of {x} born?",
        "The founder of {x} was born in which country?")),
    Template("founder_river", "company", ("founder", "born_in"), "river", (
        "Which river flows through the birthplace of the founder of {x}?",
        "The founder of {x} was born in a town on a river. Which river?")),
    Template("founder_town_year", "company", ("founder", "born_in"), "year", (
        "In which year was the birthplace of the founder of {x} founded?",
        "When was the town where the founder of {x} was born founded? Give the year.")),
    Template("birth_country", "person", ("born_in", "country"), "title", (
        "In which country was {x} born?",
        "{x} was born in a town in which country?")),
    Template("birth_river", "person", ("born_in",), "river", (
        "Which river flows through the town where {x} was born?",
        "{x} was born in a town on a river. Which river?")),
    Template("birth_town_year", "person", ("born_in",), "year", (
        "In which year was the town where {x} was born founded?",
        "When was the birthplace of {x} founded? Give the year.")),
    Template("company_product", "person", ("company",), "product", (
        "What is the main product of the company founded by {x}?",
        "{x} founded a company. What is its main product?")),
    Template("company_hq", "person", ("company", "hq"), "title", (
        "In which town is the company founded by {x} headquartered?",
        "{x} founded a company. In which town is it headquartered?")),
    Template("company_country", "person", ("company", "hq", "country"), "title", (
        "In which country is the company founded by {x} headquartered?",
        "{x} founded a company. In which country are its headquarters?")),
    Template("company_river", "person", ("company", "hq"), "river", (
        "Which river flows through the town where the company founded by {x} is headquartered?",
        "{x} founded a company. Which river flows through the town of its headquarters?")),
)

# How the reference (privileged teacher hint) states each fact.
FACT_PHRASES = {
    "founder": "was founded by {}", "hq": "is headquartered in {}", "born_in": "was born in {}",
    "company": "founded {}", "country": "is a town in {}", "river": "has the river {} flowing through it",
    "year": "was founded in {}", "product": "has the main product {}",
}

PROMPT = (
    "Answer the question below using the tools. `search` finds documents by keywords and lists their ids; "
    "`open_document` shows a document's full text. The documents describe made-up places, people and "
    "companies, so look every fact up: the answer needs facts from more than one document.\n"
    "When you know the answer, reply without a tool call, ending with the line\n"
    "Answer: <answer>\n"
    "Give only the name, year or product.\n\n"
    "Question: {question}"
)


@dataclass(frozen=True)
class Question:
    template: Template
    chain: tuple[Document, ...]  # anchor, then each entity the path reaches
    docs: tuple[Document, ...]  # the documents that must be read, in order
    answer: str

    @property
    def key(self) -> str:
        return f"{self.template.name}:{self.chain[0].id}"


@dataclass(frozen=True)
class World:
    index: DocumentIndex
    questions: dict[str, list[Question]]  # split -> questions (corpus order, then template order)


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (SQuAD-style)."""
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


_ANSWER_MARK = re.compile(r"answer\s*:", re.IGNORECASE)


def extract_answer(text: str) -> str:
    """The first line after the last "Answer:" (also "Final Answer:"); without one, the last line."""
    marks = list(_ANSWER_MARK.finditer(text))
    lines = [line.strip() for line in (text[marks[-1].end():] if marks else text).splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] if marks else lines[-1]


def is_heldout_anchor(title: str) -> bool:
    return hashlib.sha256(f"retrieval_qa:{title}".encode()).digest()[0] < HELDOUT_HASH_BELOW


def _question(template: Template, anchor: Document, docs: dict[str, Document]) -> Question | None:
    chain = [anchor]
    for key in template.path:
        target_id = chain[-1].facts.get(key)
        if target_id is None:  # e.g. a person who founded no company
            return None
        chain.append(docs[target_id])
    if template.target == "title":
        to_read, answer = chain[:-1], chain[-1].title
    else:
        to_read, answer = chain, str(chain[-1].facts[template.target])
    # Only the last document may state the answer, so no question is answerable from one hop.
    if any(f" {normalize(answer)} " in f" {normalize(d.title + ' ' + d.text)} " for d in to_read[:-1]):
        return None
    return Question(template, tuple(chain), tuple(to_read), answer)


@functools.cache
def load_world(path: Path = CORPUS_PATH) -> World:
    """The index and the question pools for a corpus, built once per process."""
    corpus = load_corpus(path)
    docs = {d.id: d for d in corpus}
    questions: dict[str, list[Question]] = {"train": [], "heldout": []}
    for anchor in corpus:
        for template in TEMPLATES:
            if anchor.facts.get("kind") != template.anchor_kind:
                continue
            q = _question(template, anchor, docs)
            if q is not None:
                questions["heldout" if is_heldout_anchor(anchor.title) else "train"].append(q)
    return World(DocumentIndex(corpus), questions)


def reference_text(q: Question) -> str:
    """The chain of facts with doc ids, then the answer (what a privileged teacher may see)."""
    lines = []
    for entity, key, nxt in zip(q.chain, q.template.path, q.chain[1:]):
        lines.append(f"{entity.title} [{entity.id}] {FACT_PHRASES[key].format(nxt.title)}.")
    if q.template.target != "title":
        last = q.chain[-1]
        lines.append(f"{last.title} [{last.id}] {FACT_PHRASES[q.template.target].format(q.answer)}.")
    return "\n".join(lines + [f"Answer: {q.answer}"])


class RetrievalQAEnv(ToolEnv):
    """Multi-hop QA over a fictional encyclopedia with search/open_document tools."""

    system_prompt: ClassVar[str] = (
        "You are a careful research assistant. You answer questions by searching a private document "
        "collection with tools."
    )

    def bound_tools(self) -> list[Tool]:
        # The tools live on the shared index (one per process), not on the env, so ``tools`` stays empty.
        return load_world().index.tools()

    def generate_task(self, rng: np.random.Generator, seed: int, split: str) -> Task:
        pools = load_world().questions
        if split not in pools:
            raise ValueError(f"unknown split {split!r}; allowed: {sorted(pools)}")
        q = pools[split][int(rng.integers(len(pools[split])))]
        phrasing = q.template.phrasings[int(rng.integers(len(q.template.phrasings)))]
        question = phrasing.format(x=q.chain[0].title)
        return Task(
            id=f"retrieval_qa-{split}-{seed}", seed=seed, split=split, prompt=PROMPT.format(question=question),
            answer=q.answer, reference=reference_text(q),
            data={"question": question, "key": q.key,
                  "hops": [{"query": d.title, "doc_id": d.id} for d in q.docs]},
        )

    def grade(self, task: Task, answer: str) -> float:
        return float(normalize(extract_answer(answer)) == normalize(str(task.answer)))

    def expert_action(self, task: Task, history: list[Message]) -> str:
        """Per hop: search the entity's name, open its document; then answer. Reads state from history,
        so it also takes over correctly from a partial (e.g. student-written) episode."""
        for hop in task.data["hops"]:
            doc_id = hop["doc_id"]
            if any(_is_tool(m, "open_document") and m.content.startswith(f"[{doc_id}]") for m in history):
                continue
            listed = re.compile(rf"^{re.escape(doc_id)}:", re.MULTILINE)
            if any(_is_tool(m, "search") and listed.search(m.content) for m in history):
                return self.parser.format_call("open_document", {"doc_id": doc_id})
            return self.parser.format_call("search", {"query": hop["query"]})
        return f"Answer: {task.answer}"


def _is_tool(m: Message, name: str) -> bool:
    return m.role == "tool" and m.name == name
