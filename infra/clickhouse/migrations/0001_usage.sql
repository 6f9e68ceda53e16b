-- Usage and per-request results. ReplacingMergeTree on the request id makes
-- a redelivered event collapse into one row; exact reads use FINAL.
-- Kept to SQL that ClickHouse 18.16 (Debian) and chDB both accept.

CREATE TABLE IF NOT EXISTS {db}.usage_events (
    request_id String,
    tenant String,
    model String,
    input_tokens UInt64,
    output_tokens UInt64,
    cached_tokens UInt64,
    images UInt32,
    model_units Float64,
    status String,
    queue_s Float64,
    ttft_s Float64,
    tpot_s Float64,
    worker String,
    shard UInt32,
    finished_at DateTime,
    inserted_at DateTime DEFAULT now()
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMMDD(finished_at)
ORDER BY (tenant, model, request_id);

CREATE TABLE IF NOT EXISTS {db}.request_results (
    request_id String,
    tenant String,
    model String,
    status String,
    finish_reason String,
    error String,
    input_tokens UInt64,
    output_tokens UInt64,
    queue_s Float64,
    ttft_s Float64,
    tpot_s Float64,
    total_s Float64,
    worker String,
    shard Int32,
    completed_at DateTime
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMMDD(completed_at)
ORDER BY (tenant, model, request_id);
