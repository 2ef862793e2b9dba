//! The Sluice agent: loads the kernel programs, keeps their maps in line with
//! the config, and serves health, metrics and the services API.

pub mod agent;
pub mod api;
pub mod batch;
pub mod bpffs;
pub mod build_info;
pub mod cli;
pub mod config;
pub mod control;
pub mod counters;
pub mod datapath;
pub mod decap;
pub mod discovery;
pub mod events;
pub mod http;
pub mod inspect;
pub mod maglev;
pub mod metrics;
pub mod neighbour;
pub mod netdev;
pub mod netlink;
pub mod nodeport;
pub mod pinning;
pub mod published;
pub mod readmit;
pub mod reconcile;
pub mod refusal;
pub mod state;
pub mod sweep;
pub mod sysctl;
pub mod view;
pub mod writer;
