"""How every model of a request body reads it: pydantic's configuration shared by the API's request schemas."""

from pydantic import ConfigDict

# Unknown fields are ignored (clients send other servers' extras), no float is NaN or Infinity, and every value has
# its JSON type: strict, as OpenAI's API is, where pydantic's lax mode took "2" or true for 2 and 1 and "true" for
# true, so that a client's mistyped field read as a value it did not write instead of being named in a 422
REQUEST = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)
