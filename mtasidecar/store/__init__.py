"""Storage: peewee models and the Store that reads and writes them."""

from .models import Attachment, Domain, Mailbox, Message, MessageBody, Token
from .store import MessageFilter, NewMessage, Store, compress, decompress, domain_of

__all__ = ["Attachment", "Domain", "Mailbox", "Message", "MessageBody", "MessageFilter", "NewMessage", "Store", "Token",
           "compress", "decompress", "domain_of"]
