//! The `backend_proto` fuzz harness: a stream of datagrams, as a compromised back-end (or a
//! corrupted monitor) could send them, through the decoder and the window's ownership table.
//!
//! Input: repeated `[len: u8][len bytes]` datagrams (a length past the end takes the rest).
//! Invariants: no panic; whatever decodes re-encodes to the same bytes; a request the back-end
//! would act on lies inside the window; the table never lends overlapping or out-of-window
//! ranges, a reply takes back exactly what was lent for its request, and the bytes it counts as
//! lent match the ranges it holds.

use crate::ownership::{Owner, WindowTable};
use crate::proto::{MSG_LEN, Msg, Op, ProtoError};

/// The window the harness models (small, so ranges collide often).
const WINDOW: u64 = 1 << 18;

pub fn fuzz_proto(data: &[u8]) {
    let mut table = WindowTable::new(WINDOW);
    let mut lent: Vec<(u64, u64, u64)> = Vec::new();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (dgram, next) = tail.split_at(n);
        rest = next;
        match Msg::decode(dgram) {
            Ok(m) => {
                assert_eq!(dgram.len(), MSG_LEN);
                assert_eq!(Msg::decode(&m.encode()), Ok(m), "re-encoding changes {m:?}");
                if m.check_request(WINDOW).is_ok() {
                    assert!(!matches!(
                        m.op,
                        Op::Hello | Op::Done | Op::Received | Op::SockReady
                    ));
                    if m.lends_window() {
                        assert!(m.window + m.len <= WINDOW);
                        if table.lend(m.window, m.len, m.id).is_ok() {
                            lent.push((m.id, m.window, m.len));
                        }
                    }
                }
                if matches!(m.op, Op::Done | Op::Received) {
                    let expected = lent.iter().position(|&(id, _, _)| id == m.id);
                    match (table.take_back(m.id), expected) {
                        (Ok(range), Some(i)) => {
                            let (_, s, l) = lent.remove(i);
                            assert_eq!(range, (s, l));
                        }
                        (Err(_), None) => {}
                        (r, e) => panic!("take_back({}) = {r:?}, model {e:?}", m.id),
                    }
                }
            }
            Err(ProtoError::Report(text)) => {
                assert!(text.chars().all(|c| !c.is_control()));
                assert!(text.chars().count() <= 220);
            }
            Err(_) => {}
        }
        assert_eq!(
            table.lent_bytes(),
            lent.iter().map(|&(_, _, l)| l).sum::<u64>()
        );
        for &(id, s, l) in &lent {
            assert_eq!(table.owner(s), Owner::BackEnd(id));
            assert_eq!(table.owner(s + l - 1), Owner::BackEnd(id));
            assert!(!table.monitor_owns(s, l));
        }
    }
    let returned = table.take_all_back();
    assert_eq!(returned.len(), lent.len());
    assert!(table.monitor_owns(0, WINDOW));
}

/// Seed inputs: a session of well-formed requests and replies, and a violation report.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let frame = |msgs: &[Msg]| {
        let mut v = Vec::new();
        for m in msgs {
            v.push(MSG_LEN as u8);
            v.extend_from_slice(&m.encode());
        }
        v
    };
    let rw = |op, id, window, len| Msg {
        offset: 4096 * id,
        window,
        len,
        ..Msg::new(op, id)
    };
    let mut report = frame(&[rw(Op::Write, 1, 0, 4096)]);
    let text =
        b"bulwark: seccomp: the blk0 back-end thread made the forbidden system call 101 (ptrace)";
    report.push(text.len() as u8);
    report.extend_from_slice(text);
    vec![
        (
            "seed-session",
            frame(&[
                Msg {
                    arg: 1,
                    ..Msg::new(Op::Hello, 0)
                },
                rw(Op::Write, 1, 0, 4096),
                Msg::done(1, 0),
                rw(Op::Read, 2, 4096, 8192),
                rw(Op::Read, 3, 0, 4096),
                Msg::done(3, 5),
                Msg::done(2, 0),
                Msg::new(Op::Flush, 4),
                Msg::done(4, 0),
            ]),
        ),
        (
            "seed-punch",
            frame(&[
                Msg {
                    offset: 0,
                    len: 1 << 20,
                    ..Msg::new(Op::Discard, 5)
                },
                Msg {
                    offset: 512,
                    len: 512,
                    arg: 1,
                    ..Msg::new(Op::WriteZeroes, 6)
                },
                Msg::done(6, 0),
            ]),
        ),
        (
            "seed-net",
            frame(&[
                Msg {
                    arg: 2,
                    ..Msg::new(Op::Hello, 0)
                },
                Msg {
                    arg: 7,
                    ..Msg::new(Op::SetOffload, 1)
                },
                Msg::done(1, 0),
                Msg {
                    window: 69632,
                    len: 69632,
                    ..Msg::new(Op::RxPost, 2)
                },
                Msg {
                    window: 0,
                    len: 1514,
                    ..Msg::new(Op::Transmit, 3)
                },
                Msg {
                    len: 60,
                    ..Msg::new(Op::Received, 2)
                },
                Msg::done(3, 11),
            ]),
        ),
        (
            "seed-overlap-and-stray-reply",
            frame(&[
                rw(Op::Write, 7, 0, 8192),
                rw(Op::Write, 8, 4096, 8192),
                Msg::done(8, 0),
                Msg::done(9, 0),
                Msg::done(7, 0),
            ]),
        ),
        (
            "seed-vsock",
            frame(&[
                Msg {
                    arg: 3,
                    ..Msg::new(Op::Hello, 0)
                },
                Msg {
                    offset: 1 << 32 | 2,
                    ..Msg::new(Op::SockAdopt, 1)
                },
                Msg::done(1, 0),
                Msg {
                    offset: 1 << 32 | 2,
                    arg: 1,
                    ..Msg::new(Op::SockWatch, 2)
                },
                Msg::done(2, 0),
                Msg {
                    offset: 1 << 32 | 2,
                    arg: 1,
                    ..Msg::new(Op::SockReady, 0)
                },
                Msg {
                    offset: 1 << 32 | 2,
                    window: 0,
                    len: 65536,
                    ..Msg::new(Op::SockRecv, 3)
                },
                Msg {
                    len: 17,
                    ..Msg::done(3, 0)
                },
                Msg {
                    offset: 1 << 32 | 2,
                    window: 0,
                    len: 4096,
                    ..Msg::new(Op::SockSend, 4)
                },
                Msg::done(4, 11),
                Msg {
                    offset: 1 << 32 | 2,
                    ..Msg::new(Op::SockClose, 5)
                },
                Msg::done(5, 0),
            ]),
        ),
        ("seed-report", report),
    ]
}
