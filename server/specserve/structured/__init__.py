"""Structured outputs: JSON schemas, regexes, grammars and tools, from a request to the grammar served.

The gateway pre-checks a request's constraints (:mod:`.precheck`) and edits its body on the way
(:mod:`.request`, :mod:`.tools`: legacy ``guided_*`` fields, the strict keyword). The engine
rewrites each schema into the grammar it serves (:mod:`.engine_grammar`, :mod:`.served`) and
compiles it (:mod:`.compile`, :mod:`.workers`). This package module imports nothing, so the
engine's import of its grammar modules loads none of the gateway's.
"""
