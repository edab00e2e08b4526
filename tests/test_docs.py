"""The documentation: README's module map is the package, and every relative link resolves."""

import re

import pytest

from conftest import ROOT

README = ROOT / 'README.md'
DOCS = ROOT / 'docs'
MODULE_MAP_HEADING = '## How it fits together'
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')


def _module_map_paths() -> set[str]:
  """The `bcjax/...py` paths in the first column of README's module table."""
  text = README.read_text()
  assert MODULE_MAP_HEADING in text, f'README has no "{MODULE_MAP_HEADING}" section'
  section = text.split(MODULE_MAP_HEADING, 1)[1].split('\n## ', 1)[0]
  return set(re.findall(r'^\| `(bcjax/[^`]+\.py)` \|', section, flags=re.MULTILINE))


def _package_modules() -> set[str]:
  """Every .py file of the package as it is on disk now (subpackages' __init__.py included)."""
  return {p.relative_to(ROOT).as_posix() for p in (ROOT / 'bcjax').rglob('*.py')
          if '__pycache__' not in p.parts}


def test_readme_module_map_lists_every_module_of_the_package():
  listed, present = _module_map_paths(), _package_modules()
  assert not present - listed, f'modules missing from README\'s module map: {sorted(present - listed)}'
  assert not listed - present, f'README lists modules that do not exist: {sorted(listed - present)}'


def test_readme_is_a_guide_not_a_notebook():
  lines = README.read_text().count('\n')
  assert lines <= 350, f'README.md has {lines} lines; move detail to docs/'


def _markdown_files():
  return [README, *sorted(DOCS.glob('*.md')), *sorted((ROOT / 'benchmarks').glob('*.md'))]


@pytest.mark.parametrize('page', _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_to_an_existing_file(page):
  broken = []
  for target in LINK.findall(page.read_text()):
    if re.match(r'^[a-z][a-z0-9+.-]*:', target) or target.startswith('#'):
      continue  # A URL, or an anchor in the same page.
    path = target.split('#', 1)[0]
    if not (page.parent / path).exists():
      broken.append(target)
  assert not broken, f'{page.relative_to(ROOT)}: links to missing files: {broken}'


def test_docs_index_lists_every_page():
  index = (DOCS / 'index.md').read_text()
  linked = {t.split('#', 1)[0] for t in LINK.findall(index)}
  pages = {p.name for p in DOCS.glob('*.md')} - {'index.md'}
  assert not pages - linked, f'docs/index.md does not list: {sorted(pages - linked)}'
