//! Per-method gRPC metrics: a tower layer on the gRPC servers that counts
//! each call by method and status code, with a latency histogram.
//!
//! The latency is the time to the response's headers: the whole call for
//! unary methods, the time to the first message for streaming ones. The
//! status is read from the headers, where a server that fails a call puts
//! it (a trailers-only response); a call whose headers carry none is
//! counted as OK (its status, in the trailers, is OK for every unary
//! success).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tonic::codegen::http;

/// Upper bounds of the latency buckets, in microseconds.
pub const LATENCY_BUCKET_BOUNDS_MICROS: [u64; 12] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000,
];
/// Buckets: one per bound, and one for the slower rest.
pub const LATENCY_BUCKETS: usize = LATENCY_BUCKET_BOUNDS_MICROS.len() + 1;
/// Distinct (method, status) series kept, at most; calls beyond are
/// counted under the method `other` (unknown paths cannot grow memory).
const SERIES_MAX: usize = 512;

/// Calls of one method that ended with one status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Calls.
    pub calls: u64,
    /// Calls by latency bucket (see `LATENCY_BUCKET_BOUNDS_MICROS`).
    pub buckets: [u64; LATENCY_BUCKETS],
    /// Total latency, in microseconds.
    pub micros_total: u64,
}

/// The counters, shared by the layer and `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct GrpcMetrics {
    inner: Arc<Mutex<Series>>,
}

/// Stats by method, then by status code; looked up without allocating,
/// so that only a method's first call allocates.
#[derive(Debug, Default)]
struct Series {
    by_method: HashMap<String, HashMap<&'static str, CallStats>>,
    count: usize,
}

impl GrpcMetrics {
    fn record(&self, method: &str, code: &'static str, micros: u64) {
        // The path is the client's: only a plain gRPC method name becomes
        // a label value (the Prometheus text encoder does not escape them,
        // so a path holding `"` or `}` would break every later scrape).
        let method = if is_plain_method(method) {
            method
        } else {
            "other"
        };
        let mut series = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let series = &mut *series;
        let known = series
            .by_method
            .get(method)
            .is_some_and(|codes| codes.contains_key(code));
        let method = if known || series.count < SERIES_MAX {
            method
        } else {
            "other"
        };
        if !series.by_method.contains_key(method) {
            series.by_method.insert(method.to_string(), HashMap::new());
        }
        let Some(codes) = series.by_method.get_mut(method) else {
            return;
        };
        if !codes.contains_key(code) {
            series.count += 1;
        }
        let stats = codes.entry(code).or_default();
        stats.calls += 1;
        stats.micros_total = stats.micros_total.saturating_add(micros);
        let bucket = LATENCY_BUCKET_BOUNDS_MICROS
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(LATENCY_BUCKETS - 1);
        stats.buckets[bucket] += 1;
    }

    /// Every (method, status code name) series so far.
    pub fn snapshot(&self) -> Vec<(String, &'static str, CallStats)> {
        let series = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = series
            .by_method
            .iter()
            .flat_map(|(method, codes)| {
                codes
                    .iter()
                    .map(|(code, stats)| (method.clone(), *code, *stats))
            })
            .collect();
        all.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        all
    }
}

/// The name of gRPC status `code`, as in `tonic::Code`'s description.
fn code_name(code: i32) -> &'static str {
    match tonic::Code::from_i32(code) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The tower layer recording into a `GrpcMetrics`.
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    metrics: GrpcMetrics,
}

impl GrpcMetricsLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: GrpcMetrics) -> GrpcMetricsLayer {
        GrpcMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> GrpcMetricsService<S> {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// A service that records each call of `inner`.
#[derive(Clone, Debug)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: GrpcMetrics,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut pending = PendingCall {
            method: request.uri().path().to_string(),
            metrics: self.metrics.clone(),
            started: Instant::now(),
            deadline: request
                .headers()
                .get("grpc-timeout")
                .and_then(|value| grpc_timeout(value.as_bytes())),
            recorded: false,
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await;
            let code = match &response {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.parse::<i32>().ok())
                    .map_or("OK", code_name),
                Err(_) => "UNKNOWN",
            };
            pending.record(code);
            response
        })
    }
}

/// A call being served: recorded with its status when it ends, or, if
/// it is dropped first, as DEADLINE_EXCEEDED when its `grpc-timeout` had
/// run out (tonic enforces it outside this layer) and CANCELLED otherwise
/// (its client reset the stream, or the connection went). The slowest
/// calls are the ones a histogram must not lose.
struct PendingCall {
    method: String,
    metrics: GrpcMetrics,
    started: Instant,
    /// The call's `grpc-timeout`, if it carried one.
    deadline: Option<Duration>,
    recorded: bool,
}

/// A `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`, `S`,
/// `m`, `u`, `n`).
fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

impl PendingCall {
    fn record(&mut self, code: &'static str) {
        let micros = self.started.elapsed().as_micros().min(u64::MAX as u128) as u64;
        self.metrics.record(&self.method, code, micros);
        self.recorded = true;
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        if !self.recorded {
            // Past its deadline, tonic dropped it; before, its client did.
            let expired = self
                .deadline
                .is_some_and(|deadline| self.started.elapsed() >= deadline);
            let code = if expired {
                "DEADLINE_EXCEEDED"
            } else {
                "CANCELLED"
            };
            self.record(code);
        }
    }
}

/// `/package.Service/Method`: ASCII letters, digits, `_`, `.` and `/`,
/// at most 128 bytes.
fn is_plain_method(path: &str) -> bool {
    path.len() <= 128
        && path
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_by_method_status_and_latency() {
        let metrics = GrpcMetrics::default();
        metrics.record("/etcdserverpb.KV/Put", "OK", 300);
        metrics.record("/etcdserverpb.KV/Put", "OK", 10_000_000);
        metrics.record("/etcdserverpb.KV/Put", "INVALID_ARGUMENT", 10);
        let all = metrics.snapshot();
        assert_eq!(all.len(), 2);
        let (method, code, ok) = &all[1];
        assert_eq!((method.as_str(), *code), ("/etcdserverpb.KV/Put", "OK"));
        assert_eq!(ok.calls, 2);
        assert_eq!(ok.buckets[1], 1);
        assert_eq!(ok.buckets[LATENCY_BUCKETS - 1], 1);
        assert_eq!(ok.micros_total, 10_000_300);
        for index in 0..2 * SERIES_MAX {
            metrics.record(&format!("/x/{index}"), "UNIMPLEMENTED", 1);
        }
        assert!(metrics.snapshot().len() <= SERIES_MAX + 1);
        assert!(metrics
            .snapshot()
            .iter()
            .any(|(method, _, _)| method == "other"));
        assert_eq!(code_name(14), "UNAVAILABLE");
    }

    /// A call dropped before it ends (its deadline ran out, or its client
    /// reset the stream) is counted too, with its latency so far: before,
    /// it vanished from the metrics.
    #[test]
    fn a_call_dropped_before_its_end_is_counted() {
        let metrics = GrpcMetrics::default();
        let never = tower::service_fn(|_: http::Request<()>| {
            std::future::pending::<Result<http::Response<()>, std::convert::Infallible>>()
        });
        let mut service = GrpcMetricsService {
            inner: never,
            metrics: metrics.clone(),
        };
        let call = |path: &str, timeout: Option<&str>| {
            let mut request = http::Request::builder().uri(path);
            if let Some(timeout) = timeout {
                request = request.header("grpc-timeout", timeout);
            }
            request.body(()).expect("request")
        };
        // Dropped past its 1 ns deadline; dropped with 100 s to go; no
        // deadline.
        let pending = tower::Service::call(&mut service, call("/etcdserverpb.KV/Put", Some("1n")));
        std::thread::sleep(Duration::from_millis(1));
        drop(pending);
        let pending =
            tower::Service::call(&mut service, call("/etcdserverpb.KV/Range", Some("100S")));
        drop(pending);
        let pending = tower::Service::call(&mut service, call("/etcdserverpb.KV/Txn", None));
        drop(pending);
        let codes: Vec<(String, &str)> = metrics
            .snapshot()
            .into_iter()
            .map(|(method, code, counts)| {
                assert_eq!(counts.calls, 1);
                (method, code)
            })
            .collect();
        assert_eq!(
            codes,
            vec![
                ("/etcdserverpb.KV/Put".to_string(), "DEADLINE_EXCEEDED"),
                ("/etcdserverpb.KV/Range".to_string(), "CANCELLED"),
                ("/etcdserverpb.KV/Txn".to_string(), "CANCELLED"),
            ]
        );
        assert_eq!(grpc_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(grpc_timeout(b"123456789S"), None, "over 8 digits");
        assert_eq!(grpc_timeout(b"5x"), None);
        assert_eq!(grpc_timeout(b"S"), None);
    }

    /// A client's path with characters a label value cannot hold (the
    /// Prometheus text encoder does not escape) is counted as `other`.
    #[test]
    fn odd_paths_are_counted_as_other() {
        let metrics = GrpcMetrics::default();
        metrics.record("/x\"}1", "UNIMPLEMENTED", 1);
        metrics.record("/a{b}", "UNIMPLEMENTED", 1);
        metrics.record(&format!("/{}", "a".repeat(200)), "UNIMPLEMENTED", 1);
        metrics.record("/etcdserverpb.KV/Range", "OK", 1);
        let methods: Vec<String> = metrics
            .snapshot()
            .into_iter()
            .map(|(method, _, _)| method)
            .collect();
        assert_eq!(methods, vec!["/etcdserverpb.KV/Range", "other"]);
    }
}
