//! The tokio runtime Regatta's processes run on.
//!
//! One setting differs from tokio's defaults: the LIFO slot is off (where
//! the build allows it; see [`lifo_slot_disabled`]). With the slot, a
//! task woken by the running task runs next on the same worker. A gRPC
//! connection's task is woken by every response that one of its streams
//! finishes, so it ran, and wrote, once per response: about 0.85 `writev`
//! per request under `regatta bench put`. Without the slot, the woken
//! connection task queues behind the other responses of the same apply
//! batch and writes them together: 0.12 `writev` per request, and 23% more
//! puts per second on one node (`docs/decisions/0006-tokio-lifo-slot.md`).

/// A multi-threaded runtime builder with every driver enabled and the
/// LIFO slot off where the build allows it.
pub fn builder() -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder
}

/// Whether [`builder`] turns the LIFO slot off: tokio offers the switch
/// only to builds with `--cfg tokio_unstable`, which the workspace's
/// `.cargo/config.toml` sets.
pub const fn lifo_slot_disabled() -> bool {
    cfg!(tokio_unstable)
}

#[cfg(test)]
mod tests {
    /// A build that lost the workspace's `--cfg tokio_unstable` (a
    /// `RUSTFLAGS` in the environment replaces the config file's flags)
    /// would quietly write once per response again.
    #[test]
    fn this_build_turns_the_lifo_slot_off() {
        assert!(
            super::lifo_slot_disabled(),
            "built without --cfg tokio_unstable: is RUSTFLAGS set? It replaces .cargo/config.toml's build.rustflags"
        );
    }
}
