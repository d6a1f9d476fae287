//! Rendered pod directions kept from pass to pass, for both renderers: most passes change a
//! few pods, and rendering a thousand unchanged ones again (their sets may hold thousands of
//! addresses) would be most of a pass's render time.

use crate::ir::Direction;
use std::collections::HashMap;

/// What a renderer made of each isolated direction (`T`), by chain name, with the direction
/// and the drop-logging switch it was made from. Entries a pass did not use go at its end.
#[derive(Debug)]
pub struct RenderMemo<T> {
    entries: HashMap<String, Kept<T>>,
    pass: u64,
}

#[derive(Debug)]
struct Kept<T> {
    direction: Direction,
    log: bool,
    rendered: T,
    /// The last pass that used it.
    pass: u64,
}

impl<T> Default for RenderMemo<T> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            pass: 0,
        }
    }
}

impl<T> RenderMemo<T> {
    pub fn begin_pass(&mut self) {
        self.pass += 1;
    }

    /// What chain `name` renders to from `direction` and `log`: kept, or made by `render`.
    pub fn get(
        &mut self,
        name: &str,
        direction: &Direction,
        log: bool,
        render: impl FnOnce() -> T,
    ) -> &T {
        let pass = self.pass;
        // Looked up by the borrowed name first: most passes find every chain kept, and a
        // key made for each would be a thousand allocations.
        let fresh = !self
            .entries
            .get(name)
            .is_some_and(|k| k.log == log && k.direction == *direction);
        if fresh {
            self.entries.insert(
                name.to_string(),
                Kept {
                    direction: direction.clone(),
                    log,
                    rendered: render(),
                    pass,
                },
            );
        }
        match self.entries.get_mut(name) {
            Some(kept) => {
                kept.pass = pass;
                &kept.rendered
            }
            None => unreachable!("inserted above"),
        }
    }

    /// Forgets what this pass did not use (pods gone or no longer isolated).
    pub fn end_pass(&mut self) {
        let pass = self.pass;
        self.entries.retain(|_, k| k.pass == pass);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
