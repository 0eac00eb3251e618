//! A reader for the pickle subset `torch.save` writes (protocol 2–5): enough
//! to walk checkpoints and find tensors. Objects are kept symbolically
//! (`Global`, `Call`, `Persistent`); nothing is executed.

/// A pickled value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// `module.name`.
    Global(String, String),
    /// `callable(*args)` (REDUCE / NEWOBJ), with state from BUILD if any.
    Call(Box<Value>, Box<Value>, Option<Box<Value>>),
    /// A persistent id (torch storages).
    Persistent(Box<Value>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    /// Items of a tuple or list.
    pub fn items(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }
    /// Entries of a dict, or of an `OrderedDict()` call with BUILD/SETITEMS state.
    pub fn entries(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(d) => Some(d),
            Value::Call(_, _, Some(state)) => state.entries(),
            _ => None,
        }
    }
    /// `dict[key]` for a string key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
    }
}

geossl_models::message_error!(
    /// A pickle this reader cannot follow (truncated, an unsupported opcode, a malformed stack); the message
    /// says which opcode at which byte.
    PickleError
);

/// Parses a pickle; errors say which opcode at which offset.
pub fn parse(data: &[u8]) -> Result<Value, PickleError> {
    let mut stack: Vec<Value> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: std::collections::HashMap<u32, Value> = std::collections::HashMap::new();
    let mut i = 0usize;
    let take = |i: &mut usize, n: usize| -> Result<&[u8], String> {
        let s = data.get(*i..*i + n).ok_or_else(|| format!("pickle truncated at byte {}", *i))?;
        *i += n;
        Ok(s)
    };
    let pop = |stack: &mut Vec<Value>| stack.pop().ok_or_else(|| "pickle stack underflow".to_string());
    let pop_mark = |stack: &mut Vec<Value>, marks: &mut Vec<usize>| -> Result<Vec<Value>, String> {
        let m = marks.pop().ok_or("pickle MARK missing")?;
        if m > stack.len() {
            return Err("pickle MARK beyond the stack".into());
        }
        Ok(stack.split_off(m))
    };
    loop {
        let at = i;
        let op = *take(&mut i, 1)?.first().ok_or("empty")?;
        match op {
            0x80 => {
                take(&mut i, 1)?;
            } // PROTO
            0x95 => {
                take(&mut i, 8)?;
            } // FRAME
            b'.' => return Ok(pop(&mut stack)?),
            b'(' => marks.push(stack.len()),
            b'}' => stack.push(Value::Dict(Vec::new())),
            b']' => stack.push(Value::List(Vec::new())),
            b')' => stack.push(Value::Tuple(Vec::new())),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'J' => {
                let b = take(&mut i, 4)?;
                stack.push(Value::Int(i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64))
            }
            b'K' => stack.push(Value::Int(take(&mut i, 1)?[0] as i64)),
            b'M' => {
                let b = take(&mut i, 2)?;
                stack.push(Value::Int(u16::from_le_bytes([b[0], b[1]]) as i64))
            }
            0x8a => {
                let n = take(&mut i, 1)?[0] as usize;
                let b = take(&mut i, n)?;
                let mut v: i64 = 0;
                for (k, byte) in b.iter().enumerate().take(8) {
                    v |= (*byte as i64) << (8 * k);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Value::Int(v))
            }
            b'G' => {
                let b = take(&mut i, 8)?;
                stack.push(Value::Float(f64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])))
            }
            b'X' | 0x8c | 0x8d | b'T' | b'U' | b'B' | b'C' | 0x8e => {
                let n = match op {
                    0x8c | b'U' | b'C' => take(&mut i, 1)?[0] as usize,
                    0x8d | 0x8e => {
                        let b = take(&mut i, 8)?;
                        u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize
                    }
                    _ => {
                        let b = take(&mut i, 4)?;
                        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
                    }
                };
                let b = take(&mut i, n)?.to_vec();
                stack.push(match op {
                    b'B' | b'C' | 0x8e => Value::Bytes(b),
                    _ => Value::Str(String::from_utf8_lossy(&b).into_owned()),
                })
            }
            b't' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Value::Tuple(items))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err("pickle stack underflow".into());
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(items))
            }
            b'l' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Value::List(items))
            }
            b'a' => {
                let v = pop(&mut stack)?;
                if let Some(Value::List(l)) = stack.last_mut() {
                    l.push(v)
                }
            }
            b'e' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                if let Some(Value::List(l)) = stack.last_mut() {
                    l.extend(items)
                }
            }
            b'd' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                let pairs = items.chunks(2).filter(|c| c.len() == 2).map(|c| (c[0].clone(), c[1].clone())).collect();
                stack.push(Value::Dict(pairs))
            }
            b's' | b'u' => {
                let items = if op == b's' {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    vec![k, v]
                } else {
                    pop_mark(&mut stack, &mut marks)?
                };
                let target = stack.last_mut().ok_or("pickle SETITEM on empty stack")?;
                let pairs = items.chunks(2).filter(|c| c.len() == 2).map(|c| (c[0].clone(), c[1].clone()));
                match target {
                    Value::Dict(d) => d.extend(pairs),
                    // OrderedDict() and similar: keep the items as the call's state.
                    Value::Call(_, _, state) => {
                        let mut d = match state.take().map(|b| *b) {
                            Some(Value::Dict(d)) => d,
                            _ => Vec::new(),
                        };
                        d.extend(pairs);
                        *state = Some(Box::new(Value::Dict(d)));
                    }
                    _ => return Err(format!("pickle SETITEM(S) on a non-dict at byte {at}").into()),
                }
            }
            b'q' => {
                let k = take(&mut i, 1)?[0] as u32;
                memo.insert(k, stack.last().cloned().ok_or("memo of empty stack")?);
            }
            b'r' => {
                let b = take(&mut i, 4)?;
                memo.insert(
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    stack.last().cloned().ok_or("memo of empty stack")?,
                );
            }
            0x94 => {
                let k = memo.len() as u32;
                memo.insert(k, stack.last().cloned().ok_or("memo of empty stack")?);
            }
            b'h' => {
                let k = take(&mut i, 1)?[0] as u32;
                stack.push(memo.get(&k).cloned().ok_or_else(|| format!("pickle memo {k} missing"))?)
            }
            b'j' => {
                let b = take(&mut i, 4)?;
                let k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                stack.push(memo.get(&k).cloned().ok_or_else(|| format!("pickle memo {k} missing"))?)
            }
            b'c' => {
                let line = |i: &mut usize| -> Result<String, String> {
                    let rest = data.get(*i..).ok_or("truncated")?;
                    let n = rest.iter().position(|&b| b == b'\n').ok_or("pickle GLOBAL without newline")?;
                    let s = String::from_utf8_lossy(&rest[..n]).into_owned();
                    *i += n + 1;
                    Ok(s)
                };
                let m = line(&mut i)?;
                let n = line(&mut i)?;
                stack.push(Value::Global(m, n))
            }
            0x93 => {
                let n = pop(&mut stack)?;
                let m = pop(&mut stack)?;
                stack.push(Value::Global(m.as_str().unwrap_or("").into(), n.as_str().unwrap_or("").into()))
            }
            b'R' | 0x81 => {
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                stack.push(Value::Call(Box::new(f), Box::new(args), None))
            }
            b'b' => {
                // BUILD: object state. An OrderedDict that already received its items
                // (SETITEMS comes first) keeps them; its BUILD state is attributes like `_metadata`.
                let state = pop(&mut stack)?;
                if let Some(Value::Call(_, _, s)) = stack.last_mut() {
                    if s.is_none() {
                        *s = Some(Box::new(state));
                    }
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(Value::Persistent(Box::new(pid)))
            }
            other => return Err(format!("unsupported pickle opcode 0x{other:02x} at byte {at}").into()),
        }
    }
}
