"""Cells like this one: FAISS indexes (`index`), the store-facing search (`explore`), label
audits (`audit`) and the index built on Ray (`distributed`)."""
