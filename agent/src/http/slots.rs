//! The connection cap of one listener. A plain cap lets whoever holds every
//! slot (a slowloris client sends half a request head and waits) lock out
//! everyone else until the header timeout frees them, only for the
//! attacker to take them again. So a new connection at the cap takes the
//! slot of the oldest connection that is doing nothing for anyone: waiting
//! for a request head (new, or kept alive between requests), or stuck on a
//! response for longer than `STUCK_RESPONSE` (a client that stopped
//! reading). A connection serving a request is left alone, and so is an
//! event stream (those have their own, smaller cap). Only when every
//! connection is busy is the new one refused.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

use super::Load;

/// A response still being written after this long no longer protects its
/// connection from eviction: the scrape or API call it serves takes
/// milliseconds, so its client has stopped reading.
pub const STUCK_RESPONSE: Duration = Duration::from_secs(30);

pub struct Slots {
    cap: usize,
    /// By id: ids grow, so the first is the oldest connection.
    open: Mutex<BTreeMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    load: Arc<Load>,
}

/// One open connection, as the cap sees it.
#[derive(Default)]
pub struct Conn {
    activity: Mutex<Activity>,
    evict: Notify,
    /// Notified when its slot is dropped: the socket is closed.
    closed: Notify,
}

#[derive(Default)]
struct Activity {
    in_flight: u32,
    /// When the oldest request in flight began.
    busy_since: Option<Instant>,
    /// A response that streams for as long as the client listens.
    streaming: bool,
}

/// A slot for a new connection, and the connection it was taken from.
pub struct Admitted {
    pub slot: Slot,
    /// Told to close; see `Conn::closed`.
    pub evicted: Option<Arc<Conn>>,
}

/// A connection's place under the cap, given back on drop.
pub struct Slot {
    id: u64,
    pub conn: Arc<Conn>,
    slots: Arc<Slots>,
}

/// A request in flight on a connection, until its response is written
/// (or dropped).
pub struct Busy(Arc<Conn>);

impl Slots {
    pub fn new(cap: usize, load: Arc<Load>) -> Arc<Self> {
        Arc::new(Self {
            cap,
            open: Mutex::default(),
            next_id: AtomicU64::new(0),
            load,
        })
    }

    /// A slot for a connection just accepted: free, or taken from the
    /// oldest idle connection (which is told to close). None when every
    /// connection is busy.
    pub fn admit(self: &Arc<Self>, now: Instant) -> Option<Admitted> {
        let mut open = self.open.lock().unwrap();
        let mut evicted = None;
        if open.len() >= self.cap {
            let Some(oldest_idle) = open
                .iter()
                .find(|(_, c)| c.evictable(now))
                .map(|(id, _)| *id)
            else {
                self.load.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            if let Some(conn) = open.remove(&oldest_idle) {
                // A stored permit: seen even if its task isn't waiting yet.
                conn.evict.notify_one();
                self.load.evicted.fetch_add(1, Ordering::Relaxed);
                evicted = Some(conn);
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::default());
        open.insert(id, conn.clone());
        self.load.open_connections.fetch_add(1, Ordering::Relaxed);
        Some(Admitted {
            slot: Slot {
                id,
                conn,
                slots: self.clone(),
            },
            evicted,
        })
    }

    pub fn len(&self) -> usize {
        self.open.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Absent when evicted: the slot went to another connection then.
        self.slots.open.lock().unwrap().remove(&self.id);
        self.slots
            .load
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
        self.conn.closed.notify_one();
    }
}

impl Conn {
    fn evictable(&self, now: Instant) -> bool {
        let a = self.activity.lock().unwrap();
        if a.streaming {
            return false;
        }
        match a.busy_since {
            None => true,
            Some(since) => now.saturating_duration_since(since) > STUCK_RESPONSE,
        }
    }

    /// Resolves once the connection's slot went to another connection.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }

    /// Resolves once the connection is closed (its slot dropped).
    pub async fn closed(&self) {
        self.closed.notified().await
    }

    /// A request arrived: busy until the returned guard drops.
    pub fn begin(self: &Arc<Self>, now: Instant) -> Busy {
        let mut a = self.activity.lock().unwrap();
        a.in_flight += 1;
        a.busy_since.get_or_insert(now);
        Busy(self.clone())
    }
}

impl Busy {
    /// The response streams (Server-Sent Events): the connection is busy
    /// for as long as it lasts, however long that is.
    pub fn streaming(&self) {
        self.0.activity.lock().unwrap().streaming = true;
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut a = self.0.activity.lock().unwrap();
        a.in_flight -= 1;
        if a.in_flight == 0 {
            *a = Activity::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(cap: usize) -> (Arc<Slots>, Arc<Load>) {
        let load = Arc::new(Load::default());
        (Slots::new(cap, load.clone()), load)
    }

    #[test]
    fn a_new_connection_at_the_cap_takes_the_oldest_idle_slot() {
        let (slots, load) = slots(3);
        let now = Instant::now();
        let a = slots.admit(now).unwrap().slot;
        let b = slots.admit(now).unwrap().slot;
        let c = slots.admit(now).unwrap().slot;
        let _serving = a.conn.begin(now);
        let d = slots.admit(now).expect("b is idle: its slot is taken");
        assert!(Arc::ptr_eq(d.evicted.as_ref().unwrap(), &b.conn));
        assert_eq!(slots.len(), 3);
        assert_eq!(load.evicted.load(Ordering::Relaxed), 1);
        // b was told to go; a (busy) and c (younger) were not.
        assert!(b.conn.evict.notified().now_or_never_ready());
        assert!(!a.conn.evict.notified().now_or_never_ready());
        assert!(!c.conn.evict.notified().now_or_never_ready());
        let closed = d.evicted.as_ref().unwrap().clone();
        assert!(!closed.closed().now_or_never_ready());
        drop(b);
        assert!(closed.closed().now_or_never_ready());
        assert_eq!(slots.len(), 3, "an evicted slot's drop frees nothing more");
        drop(d);
        assert_eq!(slots.len(), 2);
    }

    #[test]
    fn busy_and_streaming_connections_are_kept_and_the_new_one_refused() {
        let (slots, load) = slots(2);
        let now = Instant::now();
        let a = slots.admit(now).unwrap().slot;
        let b = slots.admit(now).unwrap().slot;
        let _request = a.conn.begin(now);
        let stream = b.conn.begin(now);
        stream.streaming();
        assert!(slots.admit(now).is_none());
        assert_eq!(load.refused.load(Ordering::Relaxed), 1);
        // A response stuck past the limit gives its slot up; a stream never.
        let later = now + STUCK_RESPONSE + Duration::from_secs(1);
        let c = slots.admit(later).expect("a's response is stuck").slot;
        assert!(a.conn.evict.notified().now_or_never_ready());
        let _c_request = c.conn.begin(later);
        let much_later = later + STUCK_RESPONSE * 10;
        assert!(slots.admit(much_later).is_some(), "c's response is stuck");
        assert!(!b.conn.evict.notified().now_or_never_ready());
    }

    #[test]
    fn a_finished_request_makes_the_connection_idle_again() {
        let (slots, _) = slots(1);
        let now = Instant::now();
        let a = slots.admit(now).unwrap().slot;
        let first = a.conn.begin(now);
        let second = a.conn.begin(now);
        drop(first);
        assert!(slots.admit(now).is_none(), "one request still in flight");
        drop(second);
        assert!(slots.admit(now).is_some());
    }

    trait NowOrNever {
        fn now_or_never_ready(self) -> bool;
    }

    impl<F: std::future::Future> NowOrNever for F {
        /// Polls once: whether the future is ready at once.
        fn now_or_never_ready(self) -> bool {
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            std::pin::pin!(self).poll(&mut cx).is_ready()
        }
    }
}
