//! Metrics in Prometheus' text format, served on `/metrics` by the coordinator and the workers. No
//! global registry and nothing counted twice: each scrape asks its process for [`Family`]s built
//! from the figures it keeps anyway (task counters, the job table), and encodes them with
//! `prometheus-client`. Names get the `eddy_` prefix, and counters `_total`, on the way out.

use std::borrow::Cow;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// A sample's labels, e.g. `[("job", "process"), ("vertex", "window"), ("subtask", "0")]`.
pub type Labels = Vec<(&'static str, String)>;

/// One metric: its name (without the `eddy_` prefix), help, type and samples.
#[derive(Debug, Clone)]
pub struct Family {
    name: Cow<'static, str>,
    help: Cow<'static, str>,
    counter: bool,
    samples: Vec<(Labels, f64)>,
}

impl Family {
    /// A counter: a total that only grows (`rate()` gives it per second).
    pub fn counter(name: impl Into<Cow<'static, str>>, help: impl Into<Cow<'static, str>>) -> Family {
        Family { name: name.into(), help: help.into(), counter: true, samples: Vec::new() }
    }

    /// A gauge: a value that goes up and down.
    pub fn gauge(name: impl Into<Cow<'static, str>>, help: impl Into<Cow<'static, str>>) -> Family {
        Family { name: name.into(), help: help.into(), counter: false, samples: Vec::new() }
    }

    /// The name, without the `eddy_` prefix.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a sample.
    pub fn add(&mut self, labels: Labels, value: f64) -> &mut Family {
        self.samples.push((labels, value));
        self
    }
}

#[derive(Debug)]
struct Scrape(Vec<Family>);

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in self.0.iter().filter(|f| !f.samples.is_empty()) {
            let kind = if family.counter { MetricType::Counter } else { MetricType::Gauge };
            let mut metric = encoder.encode_descriptor(&family.name, &family.help, None, kind)?;
            for (labels, value) in &family.samples {
                let sample = metric.encode_family(labels)?;
                if family.counter {
                    ConstCounter::new(value.max(0.0)).encode(sample)?;
                } else {
                    ConstGauge::new(*value).encode(sample)?;
                }
            }
        }
        Ok(())
    }
}

/// The families in Prometheus' (OpenMetrics) text format, names prefixed with `eddy_`.
pub fn render(families: Vec<Family>) -> String {
    let mut registry = Registry::with_prefix("eddy");
    registry.register_collector(Box::new(Scrape(families)));
    let mut text = String::new();
    // Writing to a String fails only on a label the encoder refuses; the text so far is kept.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        text.push_str(&format!("# encoding stopped: {e}\n"));
    }
    text
}

/// Binds the HTTP listener asked for with `flag` (none when not asked).
pub async fn listen(address: Option<&str>, flag: &str) -> Result<Option<tokio::net::TcpListener>, String> {
    let Some(address) = address else { return Ok(None) };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| format!("cannot listen on {address}: {e}; pick a free address with {flag}"))?;
    Ok(Some(listener))
}

/// `GET /metrics`, asking `families` on each scrape.
pub fn router<F, R>(families: F) -> axum::Router
where
    F: Fn() -> R + Send + Sync + 'static,
    R: std::future::Future<Output = Vec<Family>> + Send,
{
    let families = Arc::new(families);
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let families = families.clone();
            async move {
                let body = render(families().await);
                ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
            }
        }),
    )
}

/// Serves `app` on `listener` until `shutdown` resolves; a failure is logged.
pub async fn serve<S>(listener: tokio::net::TcpListener, app: axum::Router, shutdown: S)
where
    S: std::future::Future<Output = ()> + Send + 'static,
{
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "the HTTP listener stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_prefix_labels_and_totals() {
        let mut records = Family::counter("task_records_in", "Rows read.");
        records.add(vec![("job", "process".into()), ("subtask", "0".into())], 42.0);
        let mut lag = Family::gauge("task_event_time_lag_ms", "Lag.");
        lag.add(vec![("job", "process".into())], 1500.0);
        let text = render(vec![records, lag, Family::gauge("unused", "No samples: left out.")]);
        assert!(text.contains("# TYPE eddy_task_records_in counter"), "{text}");
        assert!(text.contains("eddy_task_records_in_total{job=\"process\",subtask=\"0\"} 42"), "{text}");
        assert!(text.contains("eddy_task_event_time_lag_ms{job=\"process\"} 1500"), "{text}");
        assert!(!text.contains("unused"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
