//! A short path for the unary KV calls of both APIs: `Range`, `Put`,
//! `DeleteRange` and `Txn` of `etcdserverpb.KV` and of `regatta.v1.KV`.
//!
//! tonic's generic unary machinery (path routing, a streaming decoder, an
//! encoding body with a state machine, header maps built from a `Status`,
//! boxed futures moved through several layers) cost about 4% of a node's
//! CPU per put (`BENCHMARKS.md`, session 28). These calls carry one small
//! message each way, so this layer, inside the metrics layer and in front
//! of tonic's router, serves them itself:
//! - it reads the whole request body, up to [`request_bytes_max`];
//! - it decodes the one length-prefixed gRPC message (uncompressed: no
//!   compression is offered);
//! - it calls the same handler tonic would;
//! - it answers with one data frame and the `grpc-status` trailer, or with a
//!   trailers-only error response.
//!
//! Every other path goes to tonic unchanged. The wire behaviour is tonic's
//! (`docs/api.md`, "Errors"), with two differences that are fixes: a
//! request that is not one valid message gets `INVALID_ARGUMENT` rather
//! than `INTERNAL`, and one over the size limit gets `RESOURCE_EXHAUSTED`
//! naming the limit rather than `OUT_OF_RANGE`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use tonic::body::BoxBody;
use tonic::codegen::http;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::error::{Error, Result};
use crate::etcd_api::EtcdApi;
use crate::regatta_api::RegattaApi;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The gRPC message prefix: a compression flag and a 4-byte length.
const PREFIX_BYTES: usize = 5;

/// The largest request message any KV call accepts: tonic's default
/// (4 MiB), or more when the key and value limits need it.
pub fn request_bytes_max(key_bytes_max: usize, value_bytes_max: usize) -> usize {
    const TONIC_DEFAULT_BYTES: usize = 4 * 1024 * 1024;
    const FIELDS_OVERHEAD_BYTES: usize = 64 * 1024;
    TONIC_DEFAULT_BYTES.max(key_bytes_max + value_bytes_max + FIELDS_OVERHEAD_BYTES)
}

/// The API a call belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    /// `etcdserverpb.KV`.
    Etcd,
    /// `regatta.v1.KV`.
    Regatta,
}

/// The method of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Range,
    Put,
    DeleteRange,
    Txn,
}

/// One of the calls this layer serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Call {
    api: Api,
    method: Method,
}

impl Call {
    fn of_path(path: &str) -> Option<Call> {
        let (api, method) = if let Some(method) = path.strip_prefix("/etcdserverpb.KV/") {
            (Api::Etcd, method)
        } else if let Some(method) = path.strip_prefix("/regatta.v1.KV/") {
            (Api::Regatta, method)
        } else {
            return None;
        };
        let method = match method {
            "Range" => Method::Range,
            "Put" => Method::Put,
            "DeleteRange" => Method::DeleteRange,
            "Txn" => Method::Txn,
            _ => return None,
        };
        Some(Call { api, method })
    }

    fn message_name(self) -> &'static str {
        match (self.api, self.method) {
            (Api::Etcd, Method::Range) => "etcdserverpb.RangeRequest",
            (Api::Etcd, Method::Put) => "etcdserverpb.PutRequest",
            (Api::Etcd, Method::DeleteRange) => "etcdserverpb.DeleteRangeRequest",
            (Api::Etcd, Method::Txn) => "etcdserverpb.TxnRequest",
            (Api::Regatta, Method::Range) => "regatta.v1.RangeRequest",
            (Api::Regatta, Method::Put) => "regatta.v1.PutRequest",
            (Api::Regatta, Method::DeleteRange) => "regatta.v1.DeleteRangeRequest",
            (Api::Regatta, Method::Txn) => "regatta.v1.TxnRequest",
        }
    }
}

/// How long a unary request's body may take to arrive.
pub const REQUEST_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Puts [`FastUnary`] in front of a service.
#[derive(Clone)]
pub struct FastUnaryLayer {
    apis: Arc<Apis>,
    request_bytes_max: usize,
}

/// The two services whose KV calls take the short path.
struct Apis {
    etcd: EtcdApi,
    regatta: RegattaApi,
}

impl FastUnaryLayer {
    /// Serves the unary KV calls of both APIs with `etcd` and `regatta`,
    /// refusing request messages over `request_bytes_max`.
    pub fn new(etcd: EtcdApi, regatta: RegattaApi, request_bytes_max: usize) -> FastUnaryLayer {
        FastUnaryLayer {
            apis: Arc::new(Apis { etcd, regatta }),
            request_bytes_max,
        }
    }
}

impl<S> tower::Layer<S> for FastUnaryLayer {
    type Service = FastUnary<S>;

    fn layer(&self, inner: S) -> FastUnary<S> {
        FastUnary {
            inner,
            apis: Arc::clone(&self.apis),
            request_bytes_max: self.request_bytes_max,
        }
    }
}

/// Serves `etcdserverpb.KV/{Range,Put,DeleteRange,Txn}` and the same four
/// of `regatta.v1.KV` itself, and passes every other request to `inner`.
#[derive(Clone)]
pub struct FastUnary<S> {
    inner: S,
    apis: Arc<Apis>,
    request_bytes_max: usize,
}

type Served<E> =
    Pin<Box<dyn Future<Output = std::result::Result<http::Response<BoxBody>, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for FastUnary<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<BoxBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<BoxBody>;
    type Error = S::Error;
    type Future = Served<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Every gRPC call is a POST; anything else would reach tonic, which
        // serves it as one and answers a body it cannot read with INTERNAL.
        if request.method() != http::Method::POST {
            let refused = Status::invalid_argument(format!(
                "gRPC calls are HTTP/2 POST requests, not {}",
                request.method()
            ));
            return Box::pin(std::future::ready(Ok(refused.into_http())));
        }
        let Some(call) = Call::of_path(request.uri().path()) else {
            let served = self.inner.call(request);
            return Box::pin(async move { served.await.map(refine_tonic_status) });
        };
        let apis = Arc::clone(&self.apis);
        let limit = self.request_bytes_max;
        Box::pin(async move { Ok(serve(&apis, call, request, limit).await) })
    }
}

/// tonic answers a request message it cannot decode with INTERNAL, and
/// one over its size limit with OUT_OF_RANGE, on every call this layer
/// leaves to it; client input must get neither. These become
/// INVALID_ARGUMENT and RESOURCE_EXHAUSTED, as on the short path. Only
/// trailers-only answers carry them (the handler never ran), and only
/// the texts of tonic's own decoding errors are rewritten.
fn refine_tonic_status(mut response: http::Response<BoxBody>) -> http::Response<BoxBody> {
    const DECODING: [&str; 5] = [
        "failed to decode Protobuf message",
        "Missing request message",
        "Unexpected EOF decoding stream",
        "protocol error: received message with compressed-flag",
        "protocol error: received message with invalid compression flag",
    ];
    const TOO_LARGE: &str = "Error, decoded message length too large";
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    let message = status.message();
    let code = match status.code() {
        tonic::Code::Internal if DECODING.iter().any(|text| message.starts_with(text)) => {
            tonic::Code::InvalidArgument
        }
        tonic::Code::OutOfRange if message.starts_with(TOO_LARGE) => tonic::Code::ResourceExhausted,
        _ => return response,
    };
    response
        .headers_mut()
        .insert("grpc-status", http::HeaderValue::from(code as i32));
    response
}

async fn serve<B>(
    apis: &Apis,
    call: Call,
    request: http::Request<B>,
    limit: usize,
) -> http::Response<BoxBody>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    use crate::proto::etcdserverpb::kv_server::Kv as EtcdKv;
    use crate::proto::regatta::v1::kv_server::Kv as RegattaKv;
    let (parts, body) = request.into_parts();
    // A compressed request is refused from its header, before its body is
    // read (no compression is offered).
    let encoding = parts.headers.get("grpc-encoding");
    if encoding.is_some_and(|encoding| encoding.as_bytes() != b"identity") {
        return unimplemented_compression().into_http();
    }
    // A client that never finishes its body must not hold it (up to the
    // request limit) forever.
    let read = tokio::time::timeout(REQUEST_BODY_TIMEOUT, read_message(body, limit, call));
    let read = read.await.unwrap_or_else(|_| {
        Err(Error::DeadlineExceeded(format!(
            "the request body did not arrive within {} s",
            REQUEST_BODY_TIMEOUT.as_secs()
        )))
    });
    let message = match read {
        Ok(message) => message,
        Err(error) => return Status::from(error).into_http(),
    };
    let metadata = MetadataMap::from_headers(parts.headers);
    let extensions = parts.extensions;
    // One arm per call: each decodes its own message type.
    macro_rules! unary {
        ($trait:ident, $api:expr, $method:ident) => {
            match decode(call, message) {
                Ok(message) => respond(
                    $trait::$method($api, Request::from_parts(metadata, extensions, message)).await,
                ),
                Err(error) => Status::from(error).into_http(),
            }
        };
    }
    match (call.api, call.method) {
        (Api::Etcd, Method::Range) => unary!(EtcdKv, &apis.etcd, range),
        (Api::Etcd, Method::Put) => unary!(EtcdKv, &apis.etcd, put),
        (Api::Etcd, Method::DeleteRange) => unary!(EtcdKv, &apis.etcd, delete_range),
        (Api::Etcd, Method::Txn) => unary!(EtcdKv, &apis.etcd, txn),
        (Api::Regatta, Method::Range) => unary!(RegattaKv, &apis.regatta, range),
        (Api::Regatta, Method::Put) => unary!(RegattaKv, &apis.regatta, put),
        (Api::Regatta, Method::DeleteRange) => unary!(RegattaKv, &apis.regatta, delete_range),
        (Api::Regatta, Method::Txn) => unary!(RegattaKv, &apis.regatta, txn),
    }
}

/// The refusal of a compressed request: UNIMPLEMENTED, naming the only
/// encoding accepted (`grpc-accept-encoding`), as gRPC's compression
/// rules ask.
fn unimplemented_compression() -> Status {
    let mut status =
        Status::unimplemented("compressed requests are not supported: send them uncompressed");
    status.metadata_mut().insert(
        "grpc-accept-encoding",
        tonic::metadata::MetadataValue::from_static("identity"),
    );
    status
}

/// The one message of a unary request body, without its prefix.
async fn read_message<B>(body: B, limit: usize, call: Call) -> Result<Bytes>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let too_large = |what: String| {
        Error::TooLarge(format!(
            "{what}, over the limit of {limit} bytes per request message (raise kv.value-bytes-max or kv.key-bytes-max)"
        ))
    };
    let collected = Limited::new(body, limit + PREFIX_BYTES)
        .collect()
        .await
        .map_err(|error| {
            if error.is::<http_body_util::LengthLimitError>() {
                too_large(format!("the {} is larger", call.message_name()))
            } else {
                Error::Unavailable(format!("reading the request failed: {error}"))
            }
        })?;
    let mut body = collected.to_bytes();
    if body.len() < PREFIX_BYTES {
        return Err(Error::InvalidArgument(format!(
            "the request carries no {} (a gRPC message is a 5-byte prefix and the message)",
            call.message_name()
        )));
    }
    let compressed = body.get_u8();
    let length = body.get_u32() as usize;
    match compressed {
        0 => {}
        // A compressed call names its encoding in `grpc-encoding`, which
        // is refused before the body is read: this one named none.
        1 => {
            return Err(Error::InvalidArgument(
                "the message is flagged compressed, but the call names no grpc-encoding \
                 (and none is supported: send it uncompressed)"
                    .into(),
            ))
        }
        other => {
            return Err(Error::InvalidArgument(format!(
                "the message prefix's compressed flag is {other}; gRPC allows 0 and 1"
            )))
        }
    }
    if length > limit {
        return Err(too_large(format!(
            "the {} is {length} bytes",
            call.message_name()
        )));
    }
    if body.len() != length {
        return Err(Error::InvalidArgument(format!(
            "the request body holds {} bytes after the prefix, but the prefix announces a {} of {length} bytes (one message per unary call)",
            body.len(),
            call.message_name()
        )));
    }
    Ok(body)
}

fn decode<M: prost::Message + Default>(call: Call, message: Bytes) -> Result<M> {
    M::decode(message).map_err(|error| {
        Error::InvalidArgument(format!(
            "the request is not a valid {}: {error}",
            call.message_name()
        ))
    })
}

/// A handler's outcome on the wire.
fn respond<M: prost::Message>(
    outcome: std::result::Result<tonic::Response<M>, Status>,
) -> http::Response<BoxBody> {
    match outcome {
        Ok(response) => answer(response).unwrap_or_else(|error| Status::from(error).into_http()),
        Err(status) => status.into_http(),
    }
}

/// A `200 OK` with the message as one data frame and `grpc-status: 0` as
/// the trailer.
fn answer<M: prost::Message>(response: tonic::Response<M>) -> Result<http::Response<BoxBody>> {
    let (metadata, message, _extensions) = response.into_parts();
    let length = message.encoded_len();
    let length_prefix = u32::try_from(length).map_err(|_| {
        Error::TooLarge(format!(
            "the response of {length} bytes is too large for one gRPC message"
        ))
    })?;
    let mut frame = BytesMut::with_capacity(PREFIX_BYTES + length);
    frame.put_u8(0);
    frame.put_u32(length_prefix);
    message
        .encode(&mut frame)
        .map_err(|error| Error::Internal(format!("encoding the response: {error}")))?;
    let mut trailers = http::HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let body = Full::new(frame.freeze()).with_trailers(std::future::ready(Some(Ok(trailers))));
    let mut response = http::Response::new(tonic::body::boxed(body));
    let headers = response.headers_mut();
    *headers = metadata.into_headers();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::etcdserverpb as pb;

    const PUT: Call = Call {
        api: Api::Etcd,
        method: Method::Put,
    };

    #[test]
    fn only_the_unary_kv_calls_take_the_short_path() {
        for (path, api, method) in [
            ("/etcdserverpb.KV/Range", Api::Etcd, Method::Range),
            ("/etcdserverpb.KV/Put", Api::Etcd, Method::Put),
            (
                "/etcdserverpb.KV/DeleteRange",
                Api::Etcd,
                Method::DeleteRange,
            ),
            ("/etcdserverpb.KV/Txn", Api::Etcd, Method::Txn),
            ("/regatta.v1.KV/Range", Api::Regatta, Method::Range),
            ("/regatta.v1.KV/Put", Api::Regatta, Method::Put),
            (
                "/regatta.v1.KV/DeleteRange",
                Api::Regatta,
                Method::DeleteRange,
            ),
            ("/regatta.v1.KV/Txn", Api::Regatta, Method::Txn),
        ] {
            assert_eq!(Call::of_path(path), Some(Call { api, method }), "{path}");
        }
        for other in [
            "/etcdserverpb.KV/Compact",
            "/etcdserverpb.KV/RangeStream",
            "/regatta.v1.KV/IterateRange",
            "/etcdserverpb.Maintenance/Status",
            "/regatta.v1.Tables/Create",
            "/etcdserverpb.KV/Put/",
            "/etcdserverpb.KV/",
            "",
        ] {
            assert_eq!(Call::of_path(other), None, "{other}");
        }
    }

    fn body(bytes: Vec<u8>) -> Full<Bytes> {
        Full::new(Bytes::from(bytes))
    }

    fn framed(compressed: u8, announced: u32, message: &[u8]) -> Vec<u8> {
        let mut bytes = vec![compressed];
        bytes.extend_from_slice(&announced.to_be_bytes());
        bytes.extend_from_slice(message);
        bytes
    }

    fn read(bytes: Vec<u8>, limit: usize) -> Result<Bytes> {
        futures_util::FutureExt::now_or_never(read_message(body(bytes), limit, PUT))
            .expect("a full body is ready at once")
    }

    /// The status a refusal goes out with.
    fn status(refused: Result<impl std::fmt::Debug>) -> (tonic::Code, String) {
        let status = Status::from(refused.expect_err("refused"));
        (status.code(), status.message().to_string())
    }

    #[test]
    fn a_well_framed_message_is_read_without_its_prefix() {
        let message = read(framed(0, 3, b"abc"), 100).expect("read");
        assert_eq!(&message[..], b"abc");
        let empty = read(framed(0, 0, b""), 100).expect("an empty message is valid");
        assert!(empty.is_empty());
    }

    #[test]
    fn bad_frames_get_precise_statuses_not_internal() {
        let (code, message) = status(read(vec![0, 0], 100));
        assert_eq!(code, tonic::Code::InvalidArgument, "no prefix: {message}");
        let (code, message) = status(read(framed(1, 3, b"abc"), 100));
        assert_eq!(
            code,
            tonic::Code::InvalidArgument,
            "flagged compressed without an encoding: {message}"
        );
        let (code, message) = status(read(framed(2, 3, b"abc"), 100));
        assert_eq!(code, tonic::Code::InvalidArgument, "a flag gRPC lacks");
        assert!(message.contains("flag is 2"), "{message}");
        let (code, message) = status(read(framed(0, 10, b"abc"), 100));
        assert_eq!(code, tonic::Code::InvalidArgument, "truncated");
        assert!(message.contains("10 bytes"), "{message}");
        let (code, _) = status(read(framed(0, 1, b"abc"), 100));
        assert_eq!(code, tonic::Code::InvalidArgument, "two messages");
        let (code, message) = status(decode::<pb::PutRequest>(
            PUT,
            Bytes::from_static(&[0xff, 0xff]),
        ));
        assert_eq!(code, tonic::Code::InvalidArgument, "not a message");
        assert!(message.contains("PutRequest"), "{message}");
    }

    #[test]
    fn a_message_over_the_limit_is_refused_naming_the_limit() {
        let (code, message) = status(read(framed(0, 200, &[0u8; 200]), 100));
        assert_eq!(code, tonic::Code::ResourceExhausted);
        assert!(message.contains("100 bytes"), "{message}");
        // A body within the limit whose prefix announces more is refused
        // by the announced length, naming it.
        let (code, message) = status(read(framed(0, 1_000_000, b"abc"), 100));
        assert_eq!(code, tonic::Code::ResourceExhausted);
        assert!(message.contains("1000000 bytes"), "{message}");
        assert_eq!(
            request_bytes_max(1024, 2 * 1024 * 1024),
            4 * 1024 * 1024,
            "tonic's default covers the default limits"
        );
        assert!(request_bytes_max(1024, 16 * 1024 * 1024) > 16 * 1024 * 1024);
    }

    #[test]
    fn an_answer_is_one_data_frame_and_an_ok_trailer() {
        let response = answer(tonic::Response::new(pb::PutResponse::default())).expect("answer");
        assert_eq!(response.status(), http::StatusCode::OK);
        assert_eq!(
            response.headers().get(http::header::CONTENT_TYPE),
            Some(&http::HeaderValue::from_static("application/grpc"))
        );
        let collected = futures_util::FutureExt::now_or_never(response.into_body().collect())
            .expect("ready")
            .expect("body");
        let trailers = collected.trailers().cloned().expect("trailers");
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"0"[..])
        );
        let bytes = collected.to_bytes();
        assert_eq!(&bytes[..], &[0, 0, 0, 0, 0], "an empty message, prefixed");
    }

    #[test]
    fn a_compressed_request_is_told_the_encoding_accepted() {
        let response = unimplemented_compression().into_http();
        let headers = response.headers();
        assert_eq!(
            headers.get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"12"[..])
        );
        assert_eq!(
            headers.get("grpc-accept-encoding").map(|v| v.as_bytes()),
            Some(&b"identity"[..])
        );
    }

    #[test]
    fn tonics_decoding_errors_become_client_errors() {
        let answered = |status: Status| {
            let response = refine_tonic_status(status.into_http());
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .expect("a status");
            tonic::Code::from(code)
        };
        assert_eq!(
            answered(Status::internal(
                "failed to decode Protobuf message: buffer underflow"
            )),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            answered(Status::internal("Missing request message.")),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            answered(Status::internal("Unexpected EOF decoding stream.")),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            answered(Status::internal(
                "protocol error: received message with invalid compression flag: 2 (valid flags are 0 and 1) while receiving request"
            )),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            answered(Status::out_of_range(
                "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes"
            )),
            tonic::Code::ResourceExhausted
        );
        // A handler's own INTERNAL (a storage failure) stays what it is.
        assert_eq!(
            answered(Status::internal("storage failed")),
            tonic::Code::Internal
        );
        assert_eq!(
            answered(Status::out_of_range("a revision past the end")),
            tonic::Code::OutOfRange
        );
    }
}
