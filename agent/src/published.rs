//! State one writer changes under a lock and many readers only look at.
//! Each time the writer lets go of the lock, a copy of what readers need is
//! published; readers load that copy and never take the lock, so a slow
//! scrape or API call can't hold up the writer (the reconcile loop), and a
//! busy writer never stalls a scrape.

use std::{
    ops::{Deref, DerefMut},
    sync::{Arc, LockResult, Mutex, MutexGuard, PoisonError},
};

use arc_swap::ArcSwap;

/// What readers see of a `T`.
pub trait Publish {
    type View: Send + Sync;
    fn view(&self) -> Self::View;
}

pub struct Published<T: Publish> {
    value: Mutex<T>,
    view: ArcSwap<T::View>,
}

impl<T: Publish + Default> Default for Published<T> {
    fn default() -> Self {
        let value = T::default();
        let view = ArcSwap::from_pointee(value.view());
        Self {
            value: Mutex::new(value),
            view,
        }
    }
}

impl<T: Publish> Published<T> {
    /// For the writer. The same shape as `Mutex::lock`, so its call sites
    /// read as before; dropping the guard publishes.
    pub fn lock(&self) -> LockResult<Guard<'_, T>> {
        let publish_to = &self.view;
        match self.value.lock() {
            Ok(inner) => Ok(Guard { inner, publish_to }),
            Err(poisoned) => Err(PoisonError::new(Guard {
                inner: poisoned.into_inner(),
                publish_to,
            })),
        }
    }

    /// For readers: the copy published at the writer's last unlock.
    pub fn view(&self) -> Arc<T::View> {
        self.view.load_full()
    }
}

pub struct Guard<'a, T: Publish> {
    inner: MutexGuard<'a, T>,
    publish_to: &'a ArcSwap<T::View>,
}

impl<T: Publish> Deref for Guard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T: Publish> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: Publish> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        self.publish_to.store(Arc::new(self.inner.view()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Counter(u32);

    impl Publish for Counter {
        type View = u32;
        fn view(&self) -> u32 {
            self.0
        }
    }

    #[test]
    fn readers_see_each_unlocked_change_and_never_wait() {
        let p = Published::<Counter>::default();
        assert_eq!(*p.view(), 0);
        let mut guard = p.lock().unwrap();
        guard.0 = 7;
        // Held by the writer: readers still get the last published copy.
        assert_eq!(*p.view(), 0);
        drop(guard);
        assert_eq!(*p.view(), 7);
    }
}
