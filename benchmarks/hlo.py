"""Reading compiled HLO text: what a program sends between devices, and what it runs.

Shared by the parallel benchmark (bytes of collectives per tick and per step,
whose convolutions run) and the tests (no collective inside a conditional).
No JAX import: it reads `compiled.as_text()`.
"""

import math
import re

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                'collective-permute')
_INSTRUCTION = re.compile(
    r'^\s+(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s'
    r'(?P<op>[a-z][\w\-]*)\((?P<rest>.*)$')
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*(?:\(.*)?\{\s*$')
_CALLED = re.compile(r'\b(?:to_apply|body|condition|calls|true_computation|false_computation|'
                     r'branch_computations)=(\{[^}]*\}|%?[\w.\-]+)')
_ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([^\]]*)\]')


def _type_bytes(type_text: str) -> int:
  """Bytes of an HLO result type: an array `f32[8,128]{1,0}` or a tuple of them."""
  total = 0
  for dtype, dims in _ARRAY.findall(re.sub(r'/\*.*?\*/', '', type_text)):
    if dtype == 'token':
      continue
    bits = 8 if dtype == 'pred' else int(re.match(r'[a-z]+(\d+)', dtype).group(1))
    total += math.prod(int(d) for d in re.findall(r'\d+', dims)) * bits // 8
  return total


def _moves_nothing(attributes: str) -> bool:
  """Whether a collective's groups all have one device (or its permutation only self-pairs)."""
  pairs = re.search(r'source_target_pairs=\{(.*?)\}\}', attributes)
  if pairs:
    return all(a == b for a, b in re.findall(r'\{(\d+),(\d+)', pairs.group(1) + '}'))
  iota = re.search(r'replica_groups=\[([\d,]+)\]<=', attributes)
  if iota:
    return int(iota.group(1).split(',')[-1]) <= 1
  groups = re.search(r'replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}', attributes)
  if not groups or not groups.group(1).strip():
    return False  # No groups given: every device takes part.
  return all(len(re.findall(r'\d+', g)) <= 1 for g in re.findall(r'\{([\d,\s]*)\}',
                                                                  groups.group(1)))


def collective_bytes(hlo_text: str) -> dict:
  """Result bytes of the collectives in an HLO module's text, inside and outside loops.

  Counts all-reduce, all-gather, reduce-scatter, all-to-all and
  collective-permute (asynchronous pairs once, at their `-done`), skipping
  those whose groups are single devices. A collective in a computation
  reachable from a `while` body or condition (the body of a `lax.scan`, and
  everything it calls) runs once per loop iteration; the rest once per call.

  Returns:
    {'in_loop_bytes', 'outside_loop_bytes', 'in_loop_ops', 'outside_loop_ops'}.
  """
  computation, calls, found, loop_roots, started = None, {}, [], set(), {}
  for line in hlo_text.splitlines():
    if not line.startswith((' ', '\t')):
      header = _COMPUTATION.match(line)
      if header and not line.startswith('HloModule'):
        computation = header.group('name')
        calls.setdefault(computation, set())
      continue
    instruction = _INSTRUCTION.match(line)
    if not instruction or computation is None:
      continue
    op, rest = instruction.group('op'), instruction.group('rest')
    for value in _CALLED.findall(rest):
      names = set(re.findall(r'%?([\w.\-]+)', value))
      calls[computation] |= names
      if op == 'while':
        loop_roots |= names
    base = op.removesuffix('-start').removesuffix('-done')
    if base not in COLLECTIVES:
      continue
    if op.endswith('-start'):
      started[instruction.group('name')] = _moves_nothing(rest)
      continue
    if op.endswith('-done'):
      operand = re.match(r'\s*%?([\w.\-]+)', rest)
      trivial = started.get(operand.group(1) if operand else '', False)
    else:
      trivial = _moves_nothing(rest)
    if not trivial:
      found.append((computation, _type_bytes(instruction.group('type'))))
  in_loop, frontier = set(), list(loop_roots)
  while frontier:
    name = frontier.pop()
    if name not in in_loop:
      in_loop.add(name)
      frontier.extend(calls.get(name, ()))
  inside = [size for where, size in found if where in in_loop]
  outside = [size for where, size in found if where not in in_loop]
  return {'in_loop_bytes': sum(inside), 'outside_loop_bytes': sum(outside),
          'in_loop_ops': len(inside), 'outside_loop_ops': len(outside)}


def convolution_kinds(hlo_text: str) -> str:
  """'onednn', 'xla', 'mixed' or 'none': whose convolutions a compiled program runs."""
  onednn = 'custom_call_target="bwbpf_onednn_conv' in hlo_text
  xla = re.search(r'\sconvolution\(', hlo_text) is not None
  return {(True, False): 'onednn', (False, True): 'xla', (True, True): 'mixed'}.get(
      (onednn, xla), 'none')


def collectives_in_conditionals(hlo_text: str) -> list:
  """The collective instructions of compiled HLO text that run inside a conditional's branch.

  Follows every computation a branch calls (fusions, loops, nested conditionals).
  """
  computations, name = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header and not line.startswith(' '):
      name = header.group(1)
      computations[name] = []
    elif name is not None:
      computations[name].append(line)
  called = lambda lines: {callee for line in lines
                          for callee in re.findall(r'%([\w.\-]+)', line)
                          if callee in computations}
  pending = [branch for lines in computations.values() for line in lines
             if ' conditional(' in line
             for branch in re.findall(r'%([\w.\-]+)', line.split('branch_computations=')[-1])
             if branch in computations]
  seen, found = set(), []
  while pending:
    current = pending.pop()
    if current in seen:
      continue
    seen.add(current)
    found += [line.strip() for line in computations[current]
              if any(f' {op}(' in line or f' {op}-start(' in line for op in COLLECTIVES)]
    pending.extend(called(computations[current]))
  return found
