#![no_std]
// An empty library target: tracer-user lists this crate as a build
// dependency so cargo rebuilds the embedded kernel programs when they change.
