-- Per-minute rollups per tenant and model, kept by materialized views.
-- The sink inserts each event once (it filters redeliveries before the
-- insert), so the views' sums are exact; SummingMergeTree merges rows of one
-- key in the background, so reads still GROUP BY the key and sum.

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_minute
ENGINE = SummingMergeTree()
PARTITION BY toYYYYMM(minute)
ORDER BY (tenant, model, minute)
AS SELECT
    tenant,
    model,
    toStartOfMinute(finished_at) AS minute,
    toUInt64(count()) AS requests,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cached_tokens) AS cached_tokens,
    sum(model_units) AS model_units
FROM {db}.usage_events
GROUP BY tenant, model, minute;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.results_minute
ENGINE = SummingMergeTree()
PARTITION BY toYYYYMM(minute)
ORDER BY (tenant, model, minute)
AS SELECT
    tenant,
    model,
    toStartOfMinute(completed_at) AS minute,
    toUInt64(count()) AS replies,
    toUInt64(countIf(status = 'ok')) AS ok,
    toUInt64(countIf(status = 'error')) AS errors,
    toUInt64(countIf(status = 'rejected')) AS rejected
FROM {db}.request_results
GROUP BY tenant, model, minute;
