"""Query: identifiers matched against the SQL index (PS3.4 C.2.2.2), for C-FIND/MOVE/GET
(``dicomnode.receive``) and QIDO-RS/WADO-RS (``dicomnode.web``). Reads ``schema`` only; never
opens an instance file."""

from dicomnode.query.matching import (
    ATTRS,
    UNIQUE_KEYS,
    Level,
    Model,
    Query,
    QueryError,
    QueryResult,
    build_select,
    query_from_dataset,
    run_query,
    select_instances,
    to_dataset,
    where_clause,
)

__all__ = ["ATTRS", "UNIQUE_KEYS", "Level", "Model", "Query", "QueryError", "QueryResult",
           "build_select", "query_from_dataset", "run_query", "select_instances", "to_dataset",
           "where_clause"]
