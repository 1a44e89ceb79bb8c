"""The documents are true to the code: every pg_llm SQL name they mention exists on the server
(a function, procedure, table or view of the extension, one of its roles or policies, a metric
of llm_metrics()), and
every Python method and CLI command docs/python.md names exists in the package."""
import re
from pathlib import Path

import pg_gpt3_client
from pg_gpt3_client.cli import parser

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md", REPO / "notebooks" / "README.md"]
SQL_NAME = re.compile(r"\b((?:pg_llm|llm)_[a-z0-9_]+)\b")
# Names in the documents that are not SQL objects: the engine crate, the weight-file cache
# directory, a scratch database.
NOT_SQL = {"pg_llm_engine", "pg_llm_cache", "pg_llm_regress"}


def test_every_sql_name_in_the_docs_exists(db):
    objects = {r["name"] for r in db.query(
        "SELECT p.proname::text AS name FROM pg_proc p "
        "JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e' "
        "JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm' "
        "UNION SELECT c.relname::text FROM pg_class c "
        "JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e' "
        "JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm' "
        # the group roles CREATE EXTENSION makes and the tables' row-level security policies
        "UNION SELECT rolname::text FROM pg_roles WHERE rolname IN ('llm_reader', 'llm_writer') "
        "UNION SELECT p.polname::text FROM pg_policy p "
        "JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = p.polrelid AND d.deptype = 'e' "
        "JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_llm'")}
    assert len(objects) > 50
    # The Prometheus metrics (docs/serving.md), as llm_metrics() names them, with and without
    # a histogram's _bucket / _sum / _count.
    metrics = {line.removeprefix("# TYPE ").split("{")[0].split(" ")[0]
               for line in db.query("SELECT llm_metrics() AS m")[0]["m"].splitlines()
               if line.startswith(("pg_llm_", "# TYPE pg_llm_"))}
    objects |= metrics | {re.sub(r"_(bucket|sum|count)$", "", m) for m in metrics}
    missing = {}
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for name in set(SQL_NAME.findall(text)):
            if name in objects or name in NOT_SQL or name.endswith("_"):  # llm_checkpoint_*
                continue
            # Settings (pg_llm.threads) are matched without their prefix; files by extension.
            if re.search(rf"pg_llm\.{name}|{name}\.(rs|py|sql|out|sh|md)", text):
                continue
            missing.setdefault(name, []).append(doc.name)
    assert not missing, missing


def test_every_python_method_and_command_in_the_docs_exists():
    text = (REPO / "docs" / "python.md").read_text(encoding="utf-8")
    methods = set(re.findall(r"^\| `([a-z_]+)\(", text, re.M))
    methods |= {m for cell in re.findall(r"^\| `([a-z_]+)\(.*?` / `([a-z_]+)\(", text, re.M) for m in cell}
    assert len(methods) > 20, methods
    client = pg_gpt3_client.Client
    assert sorted(m for m in methods if not hasattr(client, m)) == []
    commands = set(re.findall(r"^\| `([a-z-]+) [A-Z\[]", text, re.M))
    known = set(parser()._subparsers._group_actions[0].choices)
    assert commands and commands <= known, commands - known
