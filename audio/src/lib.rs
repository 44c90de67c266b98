//! Audio plumbing for Parley: plain synchronous code, no async runtime.
