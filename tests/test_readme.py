from pipeline.arch import support_table

from .conftest import ROOT


def test_readme_carries_the_generated_support_table():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- support-table:start -->") + len("<!-- support-table:start -->")
    end = readme.index("<!-- support-table:end -->")
    assert readme[start:end].strip() == support_table()
