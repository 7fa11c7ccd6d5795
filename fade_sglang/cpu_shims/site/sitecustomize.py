"""Runs at interpreter start in CPU server children (this directory is on their PYTHONPATH only on a
host without the real ``sgl_kernel``; see ``fade_sglang.cpu_shims``).

Installs the import-only torchvision fake where the real torchvision does not import; the ``sgl_kernel``
stand-in next to this file is found through PYTHONPATH without any setup.
"""

import fade_fake_torchvision

fade_fake_torchvision.install_if_unusable()
