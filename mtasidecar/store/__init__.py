"""Storage: peewee models and the Store that reads and writes them."""

from .models import Attachment, Domain, Mailbox, Message, MessageBody
from .store import NewMessage, Store, compress, decompress, domain_of

__all__ = ["Attachment", "Domain", "Mailbox", "Message", "MessageBody", "NewMessage", "Store",
           "compress", "decompress", "domain_of"]
