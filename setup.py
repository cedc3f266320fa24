"""The build step that ships the templates: ``templates/*.j2`` (the source, at the top of the
checkout) are copied into the built package as ``derive/templates/``. Everything else is in
pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithTemplates(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's templates/ in place
            return
        target = Path(self.build_lib) / "derive" / "templates"
        target.mkdir(parents=True, exist_ok=True)
        for template in sorted(Path(__file__).resolve().parent.joinpath("templates").glob("*.j2")):
            shutil.copyfile(template, target / template.name)


setup(cmdclass={"build_py": BuildWithTemplates})
