from infra.clickhouse.migrate import load, split_statements


def test_migrations_are_ordered_and_templated():
    migrations = load()
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    assert migrations[0].version == 1
    for m in migrations:
        for statement in m.statements:
            assert "{db}." in statement, "tables are created in the configured database"


def test_split_statements_drops_comments_and_blank_statements():
    text = "-- a comment; with a semicolon\nCREATE TABLE a (x UInt8) ENGINE = Memory;\n\n;"
    assert split_statements(text) == ["CREATE TABLE a (x UInt8) ENGINE = Memory"]
