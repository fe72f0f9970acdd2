//! The read-only in-memory file tree behind the preopened directory `/`.

use super::{errno, Errno};
use alloc::vec::Vec;

/// Index of the root directory in [`FileTree::nodes`].
pub const ROOT: usize = 0;

#[derive(Debug)]
pub enum NodeKind {
    /// Children sorted by name: (name, node index).
    Dir(Vec<(Vec<u8>, usize)>),
    File(Vec<u8>),
    /// A character device whose contents are produced on each read.
    Device(Device),
}

/// The character devices of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// `/dev/urandom`: every read draws fresh bytes from the WASI layer's CSPRNG.
    Urandom,
}

#[derive(Debug)]
pub struct Node {
    /// The parent directory (the root is its own parent).
    pub parent: usize,
    pub kind: NodeKind,
    /// Left out of `fd_readdir` listings (still reachable by path).
    pub hidden: bool,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir(_))
    }
}

/// Why a config file could not be placed in the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeError {
    /// The path is empty, absolute or has `.`/`..`/empty components.
    BadPath,
    /// A path component is both a file and a directory, or a file is given twice.
    Conflict,
}

#[derive(Debug)]
pub struct FileTree {
    pub nodes: Vec<Node>,
}

impl Default for FileTree {
    fn default() -> Self {
        Self::new()
    }
}

impl FileTree {
    pub fn new() -> Self {
        FileTree {
            nodes: alloc::vec![Node {
                parent: ROOT,
                kind: NodeKind::Dir(Vec::new()),
                hidden: false,
            }],
        }
    }

    pub fn node(&self, idx: usize) -> Option<&Node> {
        self.nodes.get(idx)
    }

    /// Add a file at `path` (relative, `/`-separated); intermediate directories are
    /// created as needed.
    pub fn insert(&mut self, path: &[u8], data: &[u8]) -> Result<(), TreeError> {
        self.insert_node(path, NodeKind::File(data.to_vec()), false)
    }

    /// Add a node of any kind at `path`, creating intermediate directories. With
    /// `hidden`, every node this call creates (including new intermediate directories)
    /// is left out of directory listings; directories that already exist keep their
    /// visibility.
    pub fn insert_node(
        &mut self,
        path: &[u8],
        kind: NodeKind,
        hidden: bool,
    ) -> Result<(), TreeError> {
        if !vmm_abi::valid_guest_path(path) {
            return Err(TreeError::BadPath);
        }
        let mut kind = Some(kind);
        let mut cur = ROOT;
        let mut comps = path.split(|&b| b == b'/').peekable();
        while let Some(name) = comps.next() {
            let last = comps.peek().is_none();
            let new_idx = self.nodes.len();
            let NodeKind::Dir(children) = &mut self.nodes[cur].kind else {
                return Err(TreeError::Conflict);
            };
            match children.binary_search_by(|(n, _)| n.as_slice().cmp(name)) {
                Ok(pos) => {
                    if last {
                        return Err(TreeError::Conflict);
                    }
                    cur = children[pos].1;
                }
                Err(pos) => {
                    children.insert(pos, (name.to_vec(), new_idx));
                    let kind = match kind.take() {
                        Some(k) if last => k,
                        other => {
                            kind = other;
                            NodeKind::Dir(Vec::new())
                        }
                    };
                    self.nodes.push(Node {
                        parent: cur,
                        kind,
                        hidden,
                    });
                    cur = new_idx;
                }
            }
        }
        Ok(())
    }

    /// Resolve `path` relative to directory node `base`. `..` may not climb above `base`
    /// (WASI capability semantics); absolute paths are refused.
    pub fn lookup(&self, base: usize, path: &[u8]) -> Result<usize, Errno> {
        if path.is_empty() {
            return Err(errno::NOENT);
        }
        if path[0] == b'/' {
            return Err(errno::NOTCAPABLE);
        }
        if path.contains(&0) {
            return Err(errno::ILSEQ);
        }
        let mut cur = base;
        let mut depth: usize = 0;
        for name in path.split(|&b| b == b'/') {
            let node = self.nodes.get(cur).ok_or(errno::BADF)?;
            let NodeKind::Dir(children) = &node.kind else {
                return Err(errno::NOTDIR);
            };
            match name {
                b"" | b"." => {}
                b".." => {
                    if depth == 0 {
                        return Err(errno::NOTCAPABLE);
                    }
                    depth -= 1;
                    cur = node.parent;
                }
                _ => match children.binary_search_by(|(n, _)| n.as_slice().cmp(name)) {
                    Ok(pos) => {
                        cur = children[pos].1;
                        depth += 1;
                    }
                    Err(_) => return Err(errno::NOENT),
                },
            }
        }
        // A trailing slash names a directory.
        if path.last() == Some(&b'/') && !self.nodes.get(cur).is_some_and(Node::is_dir) {
            return Err(errno::NOTDIR);
        }
        Ok(cur)
    }
}
