"""Runs at interpreter start in server child processes (this directory is on PYTHONPATH).

Installs the import-only fake torchvision; the ``sgl_kernel`` stand-in next to
this file is found through PYTHONPATH without any setup.
"""

import fade_fake_torchvision

fade_fake_torchvision.install()
