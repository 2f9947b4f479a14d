"""DocumentIndex: BM25 ranking, the search/open_document tools and their error types, corpus loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from environments.retrieval_qa import CORPUS_PATH
from opd_agents.env.tool import ToolBox
from opd_agents.types import ErrorType, ToolCall, ToolResult
from tools.docs import MAX_K, Document, DocumentIndex, load_corpus

DOCS = [
    Document(id="d1", title="Velmora Textiles", text="Velmora Textiles is a weaving company in Brask. It makes wool "
             "blankets and was founded in 1923 by Ilsa Marov, a chemist who later moved to the coast."),
    Document(id="d2", title="Velmora Ceramics", text="Velmora Ceramics makes glazed tiles in Odrun."),
    Document(id="d3", title="Ilsa Marov", text="Ilsa Marov was a chemist born in Odrun."),
    Document(id="d4", title="Brask", text="Brask is a town on the river Ulve."),
]


@pytest.fixture(scope="module")
def index() -> DocumentIndex:
    return DocumentIndex(DOCS)


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return load_corpus(CORPUS_PATH)


def run(index: DocumentIndex, name: str, **args: object) -> ToolResult:
    return ToolBox(index.tools()).execute([ToolCall(name=name, arguments=dict(args))])[0]


def test_title_query_ranks_its_document_first(index: DocumentIndex) -> None:
    assert [d.id for d in index.rank("Velmora Ceramics", 3)][0] == "d2"
    assert [d.id for d in index.rank("ilsa marov", 3)][0] == "d3"  # beats d1, which also names her


def test_every_corpus_title_ranks_its_document_first(corpus: list[Document]) -> None:
    index = DocumentIndex(corpus)
    misses = [d.title for d in corpus if index.rank(d.title, 1)[0].id != d.id]
    assert misses == []


def test_search_lists_id_title_and_short_snippet(index: DocumentIndex) -> None:
    res = run(index, "search", query="Velmora", k=2)
    assert res.ok
    lines = res.content.splitlines()
    assert len(lines) == 2
    assert {line.split(":")[0] for line in lines} == {"d1", "d2"}
    d1 = next(line for line in lines if line.startswith("d1:"))
    assert d1.startswith("d1: Velmora Textiles — Velmora Textiles is a weaving")
    assert d1.endswith("…") and len(d1.split(" — ", 1)[1]) <= 81  # snippet cut at a word, ~80 chars


def test_search_default_k_is_three_and_only_positive_scores(index: DocumentIndex) -> None:
    assert len(run(index, "search", query="Velmora Odrun Brask Marov").content.splitlines()) == 3
    assert len(run(index, "search", query="Brask", k=MAX_K).content.splitlines()) == 2  # d1 and d4 only


def test_search_without_matches_says_so(index: DocumentIndex) -> None:
    for query in ("zyzzyx", "", "the and of"):  # unknown word, empty, stopwords only
        res = run(index, "search", query=query)
        assert res.ok and res.content.startswith("No documents match")


def test_open_document_returns_full_text(index: DocumentIndex) -> None:
    res = run(index, "open_document", doc_id="d1")
    assert res.ok
    assert res.content == f"[d1] Velmora Textiles\n{DOCS[0].text}"


def test_unknown_document_id_is_execution_failed(index: DocumentIndex) -> None:
    res = run(index, "open_document", doc_id="d99")
    assert res.error_type == ErrorType.execution_failed
    assert "KeyError" in res.content and "'d99'" in res.content and "search" in res.content


@pytest.mark.parametrize("args", [{"query": "x", "k": 0}, {"query": "x", "k": MAX_K + 1}, {"query": "x", "k": "many"},
                                  {"k": 2}, {"query": "x", "limit": 2}])
def test_bad_search_arguments_are_validation_failed(index: DocumentIndex, args: dict[str, object]) -> None:
    res = run(index, "search", **args)
    assert res.error_type == ErrorType.validation_failed
    assert res.content.startswith("Invalid arguments for search")


def test_schema_exports_k_bounds(index: DocumentIndex) -> None:
    schemas = {s["function"]["name"]: s["function"] for s in ToolBox(index.tools()).schemas()}
    assert set(schemas) == {"search", "open_document"}
    k = schemas["search"]["parameters"]["properties"]["k"]
    assert (k["type"], k["minimum"], k["maximum"], k["default"]) == ("integer", 1, MAX_K, 3)
    assert schemas["open_document"]["parameters"]["required"] == ["doc_id"]


def test_tools_are_bound_to_their_index() -> None:
    a, b = DocumentIndex(DOCS[:2]), DocumentIndex(DOCS[2:])
    assert run(a, "search", query="Marov").content.startswith("d1:")
    assert run(b, "search", query="Marov").content.startswith("d3:")


def test_index_rejects_empty_and_duplicate_ids() -> None:
    with pytest.raises(ValueError, match="at least one"):
        DocumentIndex([])
    with pytest.raises(ValueError, match="duplicate document id 'd1'"):
        DocumentIndex([DOCS[0], DOCS[0]])


def test_load_corpus_skips_blank_lines_and_names_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "a", "title": "A", "text": "x"}) + "\n\n", encoding="utf-8")
    assert load_corpus(good) == [Document(id="a", title="A", text="x")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "title": "A", "text": "x"}) + '\n{"id": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a valid document record"):
        load_corpus(bad)


def test_shipped_corpus_size_and_shape(corpus: list[Document]) -> None:
    assert 80 <= len(corpus) <= 150
    assert len({d.id for d in corpus}) == len(corpus)
    kinds = {d.facts["kind"] for d in corpus}
    assert kinds == {"country", "town", "person", "company"}
    for d in corpus:
        sentences = d.text.count(". ") + 1
        assert 2 <= sentences <= 4, d
