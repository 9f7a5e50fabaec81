"""Pure loss modules (no I/O, logging or device choice).

``isimed`` (distance loss), ``barlow_twins``, ``ntxent`` (SimCLR), ``simsiam`` (negative cosine with
stop-gradient) and ``context`` (context-prediction losses).
"""

from medssl.losses.barlow_twins import BarlowTwinsLoss
from medssl.losses.isimed import IsimedDistanceLoss
from medssl.losses.ntxent import NTXentLoss

__all__ = ["BarlowTwinsLoss", "IsimedDistanceLoss", "NTXentLoss"]
