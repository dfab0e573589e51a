//! Channels bounded in messages and in bytes.
//!
//! A message count alone does not bound memory: 1,024 readings of 96 MiB each are not a
//! bounded queue. Each message here holds permits of a semaphore whose permits are bytes, and
//! gives them back when it is dropped, so a queue never holds more than its byte budget
//! however large its messages are.

use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// A queued message with the bytes it holds in its queue's budget.
#[derive(Debug)]
pub struct Held<T> {
    pub item: T,
    _permit: OwnedSemaphorePermit,
}

impl<T> Held<T> {
    pub fn into_inner(self) -> T {
        self.item
    }
}

pub struct Sender<T> {
    tx: mpsc::Sender<Held<T>>,
    budget: Arc<Semaphore>,
    max_bytes: usize,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            tx: self.tx.clone(),
            budget: self.budget.clone(),
            max_bytes: self.max_bytes,
        }
    }
}

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full, in messages or in bytes.
    Full,
    /// The receiver is gone.
    Closed,
}

pub fn channel<T>(messages: usize, bytes: usize) -> (Sender<T>, mpsc::Receiver<Held<T>>) {
    let (tx, rx) = mpsc::channel(messages);
    (
        Sender {
            tx,
            budget: Arc::new(Semaphore::new(bytes)),
            max_bytes: bytes,
        },
        rx,
    )
}

fn permits(bytes: usize, max: usize) -> u32 {
    // A message larger than the whole budget takes all of it: it waits for an empty queue.
    bytes.clamp(1, max).min(u32::MAX as usize) as u32
}

impl<T> Sender<T> {
    /// Queue without waiting; the message comes back when it does not fit.
    pub fn try_send(&self, item: T, bytes: usize) -> Result<(), (T, Refused)> {
        let permit = match self
            .budget
            .clone()
            .try_acquire_many_owned(permits(bytes, self.max_bytes))
        {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err((item, Refused::Full)),
            Err(tokio::sync::TryAcquireError::Closed) => return Err((item, Refused::Closed)),
        };
        self.tx.try_send(Held { item, _permit: permit }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(h) => (h.item, Refused::Full),
            mpsc::error::TrySendError::Closed(h) => (h.item, Refused::Closed),
        })
    }

    /// Queue, waiting for room; false when the receiver is gone.
    pub async fn send(&self, item: T, bytes: usize) -> bool {
        let Ok(permit) = self
            .budget
            .clone()
            .acquire_many_owned(permits(bytes, self.max_bytes))
            .await
        else {
            return false;
        };
        self.tx.send(Held { item, _permit: permit }).await.is_ok()
    }

    /// Bytes of the budget in use.
    pub fn used_bytes(&self) -> usize {
        self.max_bytes - self.budget.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_bound_the_queue_as_well_as_messages() {
        let (tx, mut rx) = channel::<&str>(100, 1000);
        assert!(tx.try_send("a", 600).is_ok());
        assert_eq!(tx.try_send("b", 600), Err(("b", Refused::Full)), "over the byte budget");
        assert!(tx.try_send("c", 400).is_ok());
        assert_eq!(tx.used_bytes(), 1000);
        let first = rx.recv().await.expect("message");
        assert_eq!(first.item, "a");
        assert_eq!(tx.used_bytes(), 1000, "held until the message is dropped");
        drop(first);
        assert_eq!(tx.used_bytes(), 400);
        assert!(tx.try_send("b", 600).is_ok());
        // A message larger than the whole budget waits for an empty queue, then goes alone.
        let (tx, mut rx) = channel::<u8>(10, 100);
        assert!(tx.try_send(1, 10).is_ok());
        assert_eq!(tx.try_send(2, 1 << 30), Err((2, Refused::Full)));
        drop(rx.recv().await);
        assert!(tx.try_send(2, 1 << 30).is_ok());
        let (tx, _rx) = channel::<u8>(2, 1 << 20);
        assert!(tx.try_send(1, 1).is_ok() && tx.try_send(2, 1).is_ok());
        assert_eq!(tx.try_send(3, 1), Err((3, Refused::Full)), "over the message count");
    }
}
