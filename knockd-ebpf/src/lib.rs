#![no_std]
// This file only gives the crate a library target, so that `knockd` can name
// it as a build-dependency and cargo rebuilds the object when it changes.
