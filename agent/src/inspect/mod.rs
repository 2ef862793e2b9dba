//! The read side of the operator commands: what the datapath holds, named.
//! The running agent answers from its own handles and published snapshot;
//! when it is down, the commands open the pinned maps themselves
//! (`pinned`) and answer the same way.

pub mod explain;
pub mod flows;
pub mod pinned;
pub mod status;
mod tables;

use std::net::SocketAddr;

pub use tables::{Tables, open_pinned};

use crate::{config::Protocol, state::backend_state, view::Snapshot};

/// A service's name: the snapshot's, else its frontend (`VIP:PORT/PROTO`).
pub fn service_name(snapshot: &Snapshot, id: u32, vip: SocketAddr, protocol: Protocol) -> String {
    snapshot
        .service_by_id(id)
        .map(|s| s.spec.name.clone())
        .unwrap_or_else(|| format!("{vip}/{}", protocol.as_str()))
}

/// A backend's address: the snapshot's, else what its `BACKENDS` slot holds
/// (a backend already removed from the snapshot, still draining).
pub fn backend_name(tables: &Tables, snapshot: &Snapshot, id: u32) -> String {
    if let Some(b) = snapshot.backend_by_id(id) {
        return b.addr.to_string();
    }
    match tables.backends.get(&id, 0) {
        Ok(b) if b.port != 0 => {
            let v4 = b.addr[1..] == [0; 3];
            SocketAddr::new(
                agent_common::addr::words_ip(b.addr, v4),
                u16::from_be(b.port),
            )
            .to_string()
        }
        _ => format!("#{id}"),
    }
}

/// A backend's state as the API names it.
pub fn backend_state_name(tables: &Tables, snapshot: &Snapshot, id: u32) -> String {
    // Not in the snapshot: removed, and draining until its flows end.
    let draining = snapshot.backend_by_id(id).is_none_or(|b| b.draining());
    backend_state(&tables.health(id), draining).to_string()
}
