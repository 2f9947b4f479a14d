"""Document search and open tools over a small in-memory corpus, ranked lexically with BM25 (``bm25s``).

``DocumentIndex(docs).tools()`` returns the bound ``search`` and ``open_document`` tools; an environment
hands them to its ToolBox. Tokenization is bm25s' own regex tokenizer with its built-in English stopword
list and no stemmer, so building an index needs no download.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, ValidationError
from pydantic_core import core_schema

from opd_agents.env.tool import Tool, tool

MAX_K = 10
SNIPPET_CHARS = 80


class TopK(int):
    """Number of search results, 1..MAX_K.

    A class rather than ``Annotated[int, Field(ge=1, le=MAX_K)]`` because ``Tool`` reads annotations with
    ``typing.get_type_hints`` (no ``include_extras``), which drops Annotated constraints.
    """

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.int_schema(ge=1, le=MAX_K)


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    title: str
    text: str
    # Structured relations for task generators (e.g. {"kind": "town", "river": ...}); tools never show them.
    facts: dict[str, Any] = Field(default_factory=dict)


def load_corpus(path: str | Path) -> list[Document]:
    """Read a JSONL corpus (one Document per line; blank lines skipped). Errors name file and line."""
    docs = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                docs.append(Document.model_validate(json.loads(line)))
            except (json.JSONDecodeError, ValidationError) as e:
                raise ValueError(f"{path}:{lineno}: not a valid document record: {e}") from e
    return docs


def _tokenize(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class DocumentIndex:
    """BM25 index over documents; the ``search`` / ``open_document`` tools are its bound methods."""

    def __init__(self, docs: Sequence[Document]) -> None:
        if not docs:
            raise ValueError("DocumentIndex needs at least one document")
        self.docs: dict[str, Document] = {}
        for d in docs:
            if d.id in self.docs:
                raise ValueError(f"duplicate document id {d.id!r}")
            self.docs[d.id] = d
        self._order = list(self.docs)
        self._bm25 = bm25s.BM25()
        # The title is indexed along with the text so a name query prefers the entity's own document.
        self._bm25.index(_tokenize([f"{d.title} {d.text}" for d in docs]), show_progress=False)

    def rank(self, query: str, k: int) -> list[Document]:
        """Top-k documents with a positive score, best first (ties keep corpus order: deterministic)."""
        token_ids = self._bm25.get_tokens_ids(_tokenize([query])[0])  # drops words not in the corpus
        if not token_ids:
            return []
        scores = self._bm25.get_scores_from_ids(token_ids)
        best = np.argsort(-scores, kind="stable")[:k]
        return [self.docs[self._order[i]] for i in best if scores[i] > 0]

    @tool
    def search(self, query: str, k: TopK = TopK(3)) -> str:
        """Search the document collection by keywords and list the best matches with their ids.

        Args:
            query: Keywords, for example the name of a person, town or company.
            k: How many results to return (1 to 10).
        """
        hits = self.rank(query, k)
        if not hits:
            return f"No documents match {query!r}. Try other keywords."
        return "\n".join(f"{d.id}: {d.title} — {_snippet(d.text)}" for d in hits)

    @tool
    def open_document(self, doc_id: str) -> str:
        """Open a document by its id (as listed by search) and return its full text.

        Args:
            doc_id: The document id, for example "doc042".
        """
        doc = self.docs.get(doc_id.strip())
        if doc is None:
            # A short message: the corpus may be large, so no id listing.
            raise KeyError(f"no document with id {doc_id!r}; use search to find document ids")
        return f"[{doc.id}] {doc.title}\n{doc.text}"

    def tools(self) -> list[Tool]:
        return [self.search, self.open_document]


def _snippet(text: str, limit: int = SNIPPET_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + "…"
