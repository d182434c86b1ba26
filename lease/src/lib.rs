//! The epoch-fenced lease: arrives with issue 5 (see docs/).
