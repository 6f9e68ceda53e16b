-- Control-plane decisions and incidents, one row per event id.

CREATE TABLE IF NOT EXISTS {db}.scale_decisions (
    decision_id String,
    model String,
    current UInt32,
    desired UInt32,
    reason String,
    demand_stable_mu_per_min Float64,
    demand_panic_mu_per_min Float64,
    utilisation Float64,
    decided_at DateTime
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(decided_at)
ORDER BY (model, decided_at, decision_id);

CREATE TABLE IF NOT EXISTS {db}.health_events (
    event_id String,
    worker String,
    model String,
    previous String,
    state String,
    reason String,
    at DateTime
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(at)
ORDER BY (worker, at, event_id);

CREATE TABLE IF NOT EXISTS {db}.alerts (
    alert_id String,
    rule String,
    subject String,
    severity String,
    message String,
    value Float64,
    threshold Float64,
    fired_at DateTime
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(fired_at)
ORDER BY (rule, fired_at, alert_id);
