"""Issue 13's structure figures for a checkout: modules over 500 lines, functions over 60 lines,
places that read a signature, and imports across the truth boundary (defences importing
``trojanscope.metrics`` / ``trojanscope.attacks``, attacks importing defences).

    python benchmarks/structure.py [CHECKOUT]        # default: this checkout
"""
import ast, pathlib, re, sys
root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent.parent) / "src" / "trojanscope"
big, longf, sniff, bad = [], [], [], []


def _ours(node: ast.ImportFrom) -> bool:
    """A relative import or one of trojanscope's own modules (not sklearn.metrics)."""
    return node.level > 0 or (node.module or "").startswith("trojanscope")


for p in sorted(root.rglob("*.py")):
    rel = p.relative_to(root.parent)
    text = p.read_text()
    n = text.count("\n")
    if n > 500: big.append(f"{rel} {n}")
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = node.lineno
            L = node.end_lineno - start + 1
            if L > 60: longf.append(f"{rel}:{node.name} {L}")
    for i, line in enumerate(text.splitlines(), 1):
        if re.search(r"inspect\.signature|_param_names\(\)", line) and "graph_signature" not in line:
            sniff.append(f"{rel}:{i}")
    if "defenses" in rel.parts:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and _ours(node) and \
                    re.search(r"(^|\.)(metrics|attacks)(\.|$)", node.module):
                bad.append(f"{rel}: from {node.module}")
    if "attacks" in rel.parts:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and _ours(node) and "defenses" in node.module:
                bad.append(f"{rel}: from {node.module}")
print(f"modules > 500 lines: {len(big)}"); [print("  ", b) for b in big]
print(f"functions > 60 lines: {len(longf)}"); [print("  ", b) for b in longf]
print(f"signature reads: {len(sniff)}"); [print("  ", b) for b in sniff]
print(f"defences importing metrics/attacks, attacks importing defences: {len(bad)}"); [print("  ", b) for b in bad]
