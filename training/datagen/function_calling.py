"""Synthetic function-calling data in English and Korean, split by template and by tool.

Each tool has typed arguments (JSON schema) and phrasings ("templates") in both
languages. Every third phrasing of each training tool (`TOOLS`) and language goes to
the test split only, so a test request never reuses a phrasing seen in training: the
split measures whether the model learned the task, not the sentences. The tools of
`UNSEEN_TOOLS` never appear in training at all (not even among the offered tools); in
the test split (`--unseen-tools`, 20% from the command line) the model has only their
schema in the prompt. Three kinds of example (`meta.kind`), all in OpenAI's chat shape:

- `call`: the right tool among `offered` tools (the others drawn at random); the
  answer is an assistant turn with `tool_calls` (rendered per base model by
  tuneserve/tool_calls/formats.py: for SmolLM2 the JSON {"name": ..., "arguments": {...}});
- `multi_step` (`--multi-step`, 12% by default): the call, the tool's result as a
  `tool` turn, then the assistant's text answer that uses the result;
- `no_fit` (`--no-fit`, 12% by default): no offered tool fits the request (another
  tool's request with that tool left out, or a general question), and the answer is
  text, not a call.

Each line's `meta.split` names what it measures: `seen_tools` (a training tool, a
phrasing of the line's split), `unseen_tools` (a held-out tool, test only), `no_call`
(the no-fit kind) or `multi_step`; `meta.lang` its language. Training ignores `meta`.

    python -m training.datagen.function_calling --out data/fc --train 600 --test 150
"""

from __future__ import annotations

import argparse
import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

Value = str | int | float | bool


@dataclass(frozen=True)
class Template:
    lang: str  # "en" | "ko"
    text: str  # {arg} slots are filled from the tool's value pools
    fixed: dict[str, Value] = field(default_factory=dict)  # arguments implied by the wording

    def slots(self) -> list[str]:
        return [name for _, name, _, _ in string.Formatter().parse(self.text) if name]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    properties: dict[str, dict[str, Any]]
    required: list[str]
    # Mapping/Sequence: read-only, so pools of plain strings are pools of values.
    pools: Mapping[str, Mapping[str, Sequence[Value]]]  # arg -> lang ("en", "ko" or "*") -> values
    templates: list[Template]

    def spec(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": {"type": "object", "properties": self.properties, "required": self.required},
            },
        }


def _t(lang: str, text: str, **fixed: Value) -> Template:
    return Template(lang, text, fixed)


CITIES = {
    "en": ["Seoul", "Busan", "Tokyo", "Paris", "London", "New York", "Berlin", "Sydney", "Toronto", "Madrid", "Rome", "Bangkok"],
    "ko": ["서울", "부산", "인천", "대구", "광주", "제주", "대전", "도쿄", "파리", "런던"],
}
CURRENCIES = {"*": ["USD", "EUR", "KRW", "JPY", "GBP", "CNY", "CAD"]}

TOOLS: list[Tool] = [
    Tool(
        "get_weather", "Current weather for a city.",
        {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        ["city"], {"city": CITIES},
        [
            _t("en", "What's the weather like in {city} right now?"),
            _t("en", "Is it raining in {city}?"),
            _t("en", "Tell me the temperature in {city} in fahrenheit.", unit="fahrenheit"),
            _t("en", "How hot is it in {city} today, in celsius?", unit="celsius"),
            _t("en", "Do I need an umbrella in {city}?"),
            _t("en", "weather {city}"),
            _t("ko", "{city} 날씨 어때?"),
            _t("ko", "지금 {city}에 비 와?"),
            _t("ko", "{city} 기온을 섭씨로 알려줘.", unit="celsius"),
            _t("ko", "오늘 {city} 날씨 알려줘."),
            _t("ko", "{city} 가는데 우산 챙겨야 돼?"),
            _t("ko", "{city} 기온 화씨로 알려줘.", unit="fahrenheit"),
            _t("en", "Forecast for {city}, please."),
            _t("en", "Will it be sunny in {city}?"),
            _t("en", "How cold is it in {city} in celsius?", unit="celsius"),
            _t("ko", "{city} 날씨 좀 확인해줘."),
            _t("ko", "{city} 지금 맑아?"),
            _t("ko", "{city}는 지금 몇 도야? 섭씨로.", unit="celsius"),
        ],
    ),
    Tool(
        "convert_currency", "Convert an amount between currencies.",
        {"amount": {"type": "number"}, "from_currency": {"type": "string"}, "to_currency": {"type": "string"}},
        ["amount", "from_currency", "to_currency"],
        {"amount": {"*": [20, 50, 100, 250, 75.5, 1200, 9.99, 300]}, "from_currency": CURRENCIES, "to_currency": CURRENCIES},
        [
            _t("en", "Convert {amount} {from_currency} to {to_currency}."),
            _t("en", "How much is {amount} {from_currency} in {to_currency}?"),
            _t("en", "I have {amount} {from_currency}. What is that in {to_currency}?"),
            _t("en", "Exchange {amount} {from_currency} into {to_currency} please."),
            _t("en", "{amount} {from_currency} to {to_currency}?"),
            _t("en", "What would {amount} {from_currency} get me in {to_currency}?"),
            _t("ko", "{amount} {from_currency}를 {to_currency}로 바꿔줘."),
            _t("ko", "{amount} {from_currency}는 {to_currency}로 얼마야?"),
            _t("ko", "{from_currency} {amount}을 {to_currency}로 환전하면 얼마인지 알려줘."),
            _t("ko", "{amount} {from_currency}를 {to_currency}로 환전해줘."),
            _t("ko", "{from_currency} {amount}이면 {to_currency}로 얼마나 돼?"),
            _t("ko", "{amount} {from_currency} {to_currency}로 계산해줘."),
            _t("en", "Change {amount} {from_currency} to {to_currency}."),
            _t("en", "Convert my {amount} {from_currency} into {to_currency}."),
            _t("en", "What's the {to_currency} value of {amount} {from_currency}?"),
            _t("ko", "{amount} {from_currency}를 {to_currency}로 환산해줘."),
            _t("ko", "{from_currency} {amount}를 {to_currency}로 바꾸면?"),
            _t("ko", "{amount} {from_currency}가 {to_currency}로 얼마인지 계산해줘."),
        ],
    ),
    Tool(
        "set_alarm", "Set an alarm at a time (HH:MM, 24h).",
        {"time": {"type": "string"}, "label": {"type": "string"}},
        ["time"],
        {"time": {"*": ["07:30", "06:00", "08:15", "22:00", "05:45", "13:20", "09:00"]},
         "label": {"en": ["gym", "meeting", "take medicine", "school run"], "ko": ["운동", "회의", "약 먹기", "출근"]}},
        [
            _t("en", "Set an alarm for {time}."),
            _t("en", "Wake me up at {time}."),
            _t("en", "Alarm at {time} labeled {label}."),
            _t("en", "Please set an alarm at {time} for {label}."),
            _t("en", "Can you make an alarm for {time} called {label}?"),
            _t("en", "I need an alarm at {time}."),
            _t("ko", "{time}에 알람 맞춰줘."),
            _t("ko", "{time}에 {label} 알람 설정해줘."),
            _t("ko", "내일 {time}에 깨워줘."),
            _t("ko", "{time} 알람 하나 맞춰 줘."),
            _t("ko", "{label} 알람을 {time}에 울려줘."),
            _t("ko", "알람 {time}으로 설정해."),
            _t("en", "Set my alarm to {time}."),
            _t("en", "Alarm for {time} please, call it {label}."),
            _t("en", "Get me up at {time}."),
            _t("ko", "{time}에 알람 켜줘."),
            _t("ko", "{time}에 {label} 알람 부탁해."),
            _t("ko", "{time}에 일어나게 알람 해줘."),
        ],
    ),
    Tool(
        "send_email", "Send an email.",
        {"to": {"type": "string"}, "subject": {"type": "string"}},
        ["to", "subject"],
        {"to": {"*": ["alice@example.com", "bob@example.org", "minji@example.kr", "team@example.com", "hr@example.net"]},
         "subject": {"en": ["Quarterly report", "Lunch on Friday", "Project update", "Vacation request"],
                     "ko": ["주간 회의", "점심 약속", "프로젝트 진행 상황", "휴가 신청"]}},
        [
            _t("en", "Send an email to {to} with the subject {subject}."),
            _t("en", "Email {to} about {subject}."),
            _t("en", "Write to {to}, subject: {subject}."),
            _t("en", "Please mail {to} a message titled {subject}."),
            _t("en", "Shoot {to} an email, subject line {subject}."),
            _t("en", "Could you email {to}? The subject is {subject}."),
            _t("ko", "{to}에게 {subject} 제목으로 메일 보내줘."),
            _t("ko", "{to}로 {subject} 관련 이메일 보내."),
            _t("ko", "제목은 {subject}, 받는 사람은 {to}로 메일 보내줘."),
            _t("ko", "{to}한테 {subject} 메일 써서 보내줘."),
            _t("ko", "{subject}에 대한 이메일을 {to}에게 보내줘."),
            _t("ko", "{to}에게 메일 보내줘. 제목은 {subject}."),
            _t("en", "Send {to} a mail titled {subject}."),
            _t("en", "New email to {to}, subject {subject}."),
            _t("en", "Drop {to} an email about {subject}."),
            _t("ko", "{to}로 메일 하나 보내줘, 제목 {subject}."),
            _t("ko", "{subject} 제목으로 {to}에 이메일 보내."),
            _t("ko", "{to}에게 {subject} 건으로 메일 보내줘."),
        ],
    ),
    Tool(
        "search_restaurants", "Find restaurants in a city by cuisine.",
        {"city": {"type": "string"}, "cuisine": {"type": "string"}},
        ["city", "cuisine"],
        {"city": CITIES, "cuisine": {"en": ["italian", "korean", "mexican", "thai", "japanese", "vegan"],
                                     "ko": ["한식", "일식", "중식", "이탈리안", "태국 음식"]}},
        [
            _t("en", "Find {cuisine} restaurants in {city}."),
            _t("en", "Where can I eat {cuisine} food in {city}?"),
            _t("en", "Any good {cuisine} places in {city}?"),
            _t("en", "Recommend a {cuisine} restaurant in {city}."),
            _t("en", "I'm in {city} and craving {cuisine}."),
            _t("en", "Search for {cuisine} restaurants near {city}."),
            _t("ko", "{city}에 있는 {cuisine} 맛집 찾아줘."),
            _t("ko", "{city}에서 {cuisine} 먹을 만한 곳 추천해줘."),
            _t("ko", "{city} {cuisine} 식당 검색해줘."),
            _t("ko", "{city} 근처 {cuisine} 음식점 알려줘."),
            _t("ko", "{cuisine} 먹고 싶은데 {city}에 괜찮은 데 있어?"),
            _t("ko", "{city}에서 {cuisine} 레스토랑 찾아봐."),
            _t("en", "Show me {cuisine} restaurants in {city}."),
            _t("en", "Looking for {cuisine} food around {city}."),
            _t("en", "Best {cuisine} spots in {city}?"),
            _t("ko", "{city} {cuisine} 맛집 추천해줘."),
            _t("ko", "{city}에서 {cuisine} 식당 좀 찾아줘."),
            _t("ko", "{city} {cuisine} 잘하는 곳 어디야?"),
        ],
    ),
    Tool(
        "book_flight", "Book a flight on a date (YYYY-MM-DD).",
        {"origin": {"type": "string"}, "destination": {"type": "string"}, "date": {"type": "string"}},
        ["origin", "destination", "date"],
        {"origin": CITIES, "destination": CITIES,
         "date": {"*": ["2026-12-03", "2026-12-24", "2027-01-15", "2027-02-01", "2027-03-10"]}},
        [
            _t("en", "Book a flight from {origin} to {destination} on {date}."),
            _t("en", "I need to fly {origin} to {destination} on {date}."),
            _t("en", "Get me a plane ticket to {destination} from {origin}, departing {date}."),
            _t("en", "Reserve a flight {origin} -> {destination} for {date}."),
            _t("en", "Can you book me on a flight from {origin} to {destination} on {date}?"),
            _t("en", "Flight from {origin} to {destination}, {date}, please."),
            _t("ko", "{date}에 {origin}에서 {destination} 가는 비행기 예약해줘."),
            _t("ko", "{origin} 출발 {destination} 도착 {date} 항공편 잡아줘."),
            _t("ko", "{destination}행 비행기 {date} {origin} 출발로 예매해줘."),
            _t("ko", "{origin}에서 {destination}로 {date}에 가는 항공권 예약해줘."),
            _t("ko", "{date} {origin}발 {destination}행 비행기표 끊어줘."),
            _t("ko", "{date}에 {origin}에서 {destination} 가는 비행기 타고 싶어, 예약해줘."),
            _t("en", "Book me a flight to {destination} from {origin} on {date}."),
            _t("en", "Find and book a {date} flight from {origin} to {destination}."),
            _t("en", "I'd like a plane ticket from {origin} to {destination} for {date}."),
            _t("ko", "{origin}에서 {destination} 가는 {date} 비행기 예약해."),
            _t("ko", "{date} {origin} 출발 {destination}행 항공편 예약해줘."),
            _t("ko", "{origin}에서 {destination}까지 {date} 항공권 끊어줘."),
        ],
    ),
    Tool(
        "translate_text", "Translate text into a language.",
        {"text": {"type": "string"}, "target_language": {"type": "string"}},
        ["text", "target_language"],
        {"text": {"en": ["good morning", "where is the station", "thank you very much", "how much is this"],
                  "ko": ["안녕하세요", "감사합니다", "화장실이 어디예요", "이거 얼마예요"]},
         "target_language": {"en": ["French", "Spanish", "Korean", "Japanese", "German"],
                             "ko": ["영어", "일본어", "프랑스어", "중국어"]}},
        [
            _t("en", "Translate '{text}' into {target_language}."),
            _t("en", "How do you say '{text}' in {target_language}?"),
            _t("en", "What is '{text}' in {target_language}?"),
            _t("en", "Put '{text}' in {target_language} for me."),
            _t("en", "I need '{text}' translated to {target_language}."),
            _t("en", "{target_language} translation of '{text}', please."),
            _t("ko", "'{text}'를 {target_language}로 번역해줘."),
            _t("ko", "'{text}'는 {target_language}로 뭐라고 해?"),
            _t("ko", "{target_language}로 '{text}' 어떻게 말해?"),
            _t("ko", "'{text}' {target_language}로 번역 부탁해."),
            _t("ko", "이 문장 {target_language}로 바꿔줘: '{text}'"),
            _t("ko", "'{text}'를 {target_language}로 옮겨줘."),
            _t("en", "Translate this to {target_language}: '{text}'."),
            _t("en", "Say '{text}' in {target_language}."),
            _t("en", "Can you translate '{text}' to {target_language}?"),
            _t("ko", "'{text}' {target_language}로 번역해."),
            _t("ko", "{target_language}로 '{text}' 번역해줘."),
            _t("ko", "'{text}'를 {target_language}로 말하면 뭐야?"),
        ],
    ),
    Tool(
        "get_stock_price", "Latest price of a stock by ticker symbol.",
        {"symbol": {"type": "string"}},
        ["symbol"],
        {"symbol": {"*": ["AAPL", "TSLA", "NVDA", "MSFT", "AMZN", "GOOGL", "NFLX"]}},
        [
            _t("en", "What's {symbol} trading at?"),
            _t("en", "Stock price of {symbol}."),
            _t("en", "How is {symbol} doing today?"),
            _t("en", "Give me the latest quote for {symbol}."),
            _t("en", "Check the share price of {symbol}."),
            _t("en", "{symbol} price now?"),
            _t("ko", "{symbol} 주가 알려줘."),
            _t("ko", "지금 {symbol} 얼마야?"),
            _t("ko", "{symbol} 주식 시세 확인해줘."),
            _t("ko", "{symbol} 현재 주가 얼마야?"),
            _t("ko", "{symbol} 주식 지금 가격 알려줘."),
            _t("ko", "오늘 {symbol} 시세 어때?"),
            _t("en", "Current price of {symbol} stock?"),
            _t("en", "Look up {symbol} shares."),
            _t("en", "What is {symbol} worth right now?"),
            _t("ko", "{symbol} 주가 확인해줘."),
            _t("ko", "{symbol} 지금 주가 어때?"),
            _t("ko", "{symbol} 주식 얼마에 거래돼?"),
        ],
    ),
    Tool(
        "set_thermostat", "Set the thermostat to a temperature in degrees Celsius.",
        {"temperature": {"type": "integer"}, "room": {"type": "string"}},
        ["temperature"],
        {"temperature": {"*": [18, 19, 20, 21, 22, 23, 24, 25]},
         "room": {"en": ["bedroom", "living room", "kitchen", "office"], "ko": ["거실", "안방", "부엌", "서재"]}},
        [
            _t("en", "Set the thermostat to {temperature} degrees."),
            _t("en", "Make the {room} {temperature} degrees."),
            _t("en", "Heat the {room} to {temperature}."),
            _t("en", "Change the temperature to {temperature} in the {room}."),
            _t("en", "I want it at {temperature} degrees."),
            _t("en", "Turn the {room} thermostat to {temperature}."),
            _t("ko", "온도를 {temperature}도로 맞춰줘."),
            _t("ko", "{room} 온도 {temperature}도로 설정해줘."),
            _t("ko", "{room}을 {temperature}도로 해줘."),
            _t("ko", "{room} 난방 {temperature}도로 맞춰."),
            _t("ko", "실내 온도를 {temperature}도로 바꿔줘."),
            _t("ko", "{room} 온도 {temperature}도로 조절해줘."),
            _t("en", "Set the {room} to {temperature} degrees."),
            _t("en", "Adjust the thermostat to {temperature}."),
            _t("en", "Keep the {room} at {temperature} degrees."),
            _t("ko", "{room} 온도를 {temperature}도로 맞춰줘."),
            _t("ko", "보일러 {temperature}도로 설정해."),
            _t("ko", "{room} {temperature}도로 맞춰 줘."),
        ],
    ),
    Tool(
        "calculate_tip", "Tip for a bill at a percentage.",
        {"bill": {"type": "number"}, "percent": {"type": "integer"}},
        ["bill", "percent"],
        {"bill": {"*": [45.5, 120, 86.2, 33, 64.8, 210]}, "percent": {"*": [10, 15, 18, 20, 25]}},
        [
            _t("en", "What's a {percent}% tip on {bill}?"),
            _t("en", "Calculate a {percent} percent tip for a {bill} bill."),
            _t("en", "The bill is {bill}. How much is {percent}% tip?"),
            _t("en", "Tip {percent}% on {bill}, how much?"),
            _t("en", "Work out the tip: {bill} at {percent} percent."),
            _t("en", "If dinner was {bill}, what's {percent}% of it as tip?"),
            _t("ko", "{bill}에 {percent}% 팁이면 얼마야?"),
            _t("ko", "계산서가 {bill}인데 팁 {percent}% 계산해줘."),
            _t("ko", "{bill} 금액의 {percent}퍼센트 팁 알려줘."),
            _t("ko", "{bill} 나왔는데 팁 {percent}%면 얼마 줘야 돼?"),
            _t("ko", "{bill}의 {percent}% 팁 계산해줘."),
            _t("ko", "팁을 {percent}%로 하면 {bill}에서 얼마야?"),
            _t("en", "How much should I tip on {bill} at {percent}%?"),
            _t("en", "Figure out a {percent}% tip for {bill}."),
            _t("en", "{percent}% tip on a bill of {bill}?"),
            _t("ko", "{bill} 계산서에 팁 {percent}% 얼마야?"),
            _t("ko", "{bill}에 대해 {percent}% 팁 계산해."),
            _t("ko", "팁 {percent}%, 금액 {bill}, 얼마야?"),
        ],
    ),
    Tool(
        "play_music", "Play music by an artist.",
        {"artist": {"type": "string"}, "shuffle": {"type": "boolean"}},
        ["artist"],
        {"artist": {"en": ["Queen", "BTS", "Adele", "IU", "Coldplay", "Taylor Swift"],
                    "ko": ["아이유", "방탄소년단", "뉴진스", "아이브", "임영웅"]}},
        [
            _t("en", "Play some {artist}."),
            _t("en", "Put on {artist} on shuffle.", shuffle=True),
            _t("en", "I want to listen to {artist}."),
            _t("en", "Play songs by {artist}."),
            _t("en", "Shuffle {artist} for me.", shuffle=True),
            _t("en", "Start playing {artist}."),
            _t("ko", "{artist} 노래 틀어줘."),
            _t("ko", "{artist} 셔플로 재생해줘.", shuffle=True),
            _t("ko", "{artist} 음악 듣고 싶어."),
            _t("ko", "{artist} 노래 재생해줘."),
            _t("ko", "{artist} 곡들 랜덤으로 틀어줘.", shuffle=True),
            _t("ko", "{artist} 음악 좀 틀어 줄래?"),
            _t("en", "Play {artist} songs."),
            _t("en", "Play {artist} in random order.", shuffle=True),
            _t("en", "Can you put on some {artist}?"),
            _t("ko", "{artist} 노래 좀 들려줘."),
            _t("ko", "{artist} 노래 섞어서 틀어줘.", shuffle=True),
            _t("ko", "{artist} 음악 재생해."),
        ],
    ),
    Tool(
        "get_directions", "Directions between two places.",
        {"origin": {"type": "string"}, "destination": {"type": "string"},
         "mode": {"type": "string", "enum": ["driving", "walking", "transit"]}},
        ["origin", "destination", "mode"],
        {"origin": {"en": ["the airport", "City Hall", "the museum", "Central Station", "my hotel"],
                    "ko": ["공항", "시청", "강남역", "서울역", "호텔"]},
         "destination": {"en": ["the beach", "the stadium", "downtown", "the university", "the harbor"],
                         "ko": ["해변", "경기장", "명동", "대학교", "남산타워"]}},
        [
            _t("en", "How do I drive from {origin} to {destination}?", mode="driving"),
            _t("en", "Walking directions from {origin} to {destination}.", mode="walking"),
            _t("en", "Take me from {origin} to {destination} by public transport.", mode="transit"),
            _t("en", "What's the walking route from {origin} to {destination}?", mode="walking"),
            _t("en", "Which bus or train goes from {origin} to {destination}?", mode="transit"),
            _t("en", "Driving route {origin} to {destination}, please.", mode="driving"),
            _t("ko", "{origin}에서 {destination}까지 운전해서 가는 길 알려줘.", mode="driving"),
            _t("ko", "{origin}에서 {destination}까지 걸어서 어떻게 가?", mode="walking"),
            _t("ko", "{origin}에서 {destination} 대중교통으로 가는 법 알려줘.", mode="transit"),
            _t("ko", "{origin}에서 {destination}까지 차로 가는 길 안내해줘.", mode="driving"),
            _t("ko", "{origin}에서 {destination}까지 도보 경로 알려줘.", mode="walking"),
            _t("ko", "{origin}에서 {destination}까지 지하철로 어떻게 가?", mode="transit"),
            _t("en", "Give me driving directions from {origin} to {destination}.", mode="driving"),
            _t("en", "How can I walk from {origin} to {destination}?", mode="walking"),
            _t("en", "Public transit route from {origin} to {destination}?", mode="transit"),
            _t("ko", "{origin}에서 {destination}까지 자동차로 가는 길 알려줘.", mode="driving"),
            _t("ko", "{origin}에서 {destination}까지 걸어가는 길 알려줘.", mode="walking"),
            _t("ko", "{origin}에서 {destination}까지 버스로 가는 법 알려줘.", mode="transit"),
        ],
    ),
    Tool(
        "create_reminder", "Remind me of something in a number of minutes.",
        {"text": {"type": "string"}, "minutes": {"type": "integer"}},
        ["text", "minutes"],
        {"text": {"en": ["call mom", "water the plants", "check the oven", "join the standup"],
                  "ko": ["엄마한테 전화", "화분에 물 주기", "오븐 확인", "회의 참석"]},
         "minutes": {"*": [5, 10, 15, 20, 30, 45, 60]}},
        [
            _t("en", "Remind me to {text} in {minutes} minutes."),
            _t("en", "In {minutes} minutes, remind me to {text}."),
            _t("en", "Set a reminder: {text}, {minutes} minutes from now."),
            _t("en", "Don't let me forget to {text} in {minutes} minutes."),
            _t("en", "Ping me in {minutes} minutes to {text}."),
            _t("en", "Create a reminder to {text} in {minutes} min."),
            _t("ko", "{minutes}분 뒤에 {text} 알려줘."),
            _t("ko", "{minutes}분 후에 {text} 리마인더 설정해줘."),
            _t("ko", "{text} 잊지 않게 {minutes}분 있다가 알려줘."),
            _t("ko", "{minutes}분 있다가 {text} 리마인드 해줘."),
            _t("ko", "{text} {minutes}분 후에 알려줘."),
            _t("ko", "{minutes}분 뒤 {text} 알림 설정해."),
            _t("en", "Remind me in {minutes} minutes to {text}."),
            _t("en", "{minutes} minutes from now, remind me to {text}."),
            _t("en", "Add a reminder to {text} in {minutes} minutes."),
            _t("ko", "{minutes}분 후에 {text} 리마인드해줘."),
            _t("ko", "{text}, {minutes}분 뒤에 알려줘."),
            _t("ko", "{minutes}분 있다가 {text} 알림 줘."),
        ],
    ),
]


# Tools held out of training entirely: they appear only in the test split, where the
# model has nothing but their schema in the prompt to go on (split "unseen_tools"). Each
# does a job no training tool does, so a training tool offered beside one never also fits.
UNSEEN_TOOLS: list[Tool] = [
    Tool(
        "track_package", "Where a parcel is now, by its tracking number.",
        {"tracking_number": {"type": "string"}, "carrier": {"type": "string", "enum": ["ups", "fedex", "dhl"]}},
        ["tracking_number"],
        {"tracking_number": {"*": ["1Z84A20931", "TRK-552019", "77491203385", "JD014600006", "PKG-20931"]}},
        [
            _t("en", "Where is my package {tracking_number}?"),
            _t("en", "Track parcel {tracking_number}."),
            _t("en", "Has my DHL shipment {tracking_number} arrived yet?", carrier="dhl"),
            _t("en", "What's the status of UPS delivery {tracking_number}?", carrier="ups"),
            _t("en", "Check on FedEx package {tracking_number} for me.", carrier="fedex"),
            _t("en", "Where's the parcel with tracking number {tracking_number}?"),
            _t("ko", "{tracking_number} 택배 어디쯤 왔어?"),
            _t("ko", "운송장 번호 {tracking_number} 배송 조회해줘."),
            _t("ko", "DHL {tracking_number} 소포 도착했어?", carrier="dhl"),
            _t("ko", "UPS {tracking_number} 배송 상태 알려줘.", carrier="ups"),
            _t("ko", "페덱스 {tracking_number} 택배 위치 확인해줘.", carrier="fedex"),
            _t("ko", "{tracking_number} 소포 지금 어디 있어?"),
        ],
    ),
    Tool(
        "book_hotel", "Book a hotel room in a city from a check-in date (YYYY-MM-DD) for a number of nights.",
        {"city": {"type": "string"}, "check_in": {"type": "string"}, "nights": {"type": "integer"}},
        ["city", "check_in", "nights"],
        {"city": CITIES, "check_in": {"*": ["2026-12-03", "2026-12-24", "2027-01-15", "2027-02-01", "2027-03-10"]},
         "nights": {"*": [1, 2, 3, 4, 5, 7]}},
        [
            _t("en", "Book a hotel in {city} from {check_in} for {nights} nights."),
            _t("en", "I need a room in {city} for {nights} nights, checking in {check_in}."),
            _t("en", "Reserve a hotel room in {city}, {nights} nights starting {check_in}."),
            _t("en", "Find me a place to stay in {city} on {check_in} for one night.", nights=1),
            _t("en", "Get me a hotel in {city}: check-in {check_in}, {nights} nights."),
            _t("en", "Can you book {nights} nights at a hotel in {city} from {check_in}?"),
            _t("ko", "{check_in}부터 {city}에 {nights}박 호텔 예약해줘."),
            _t("ko", "{city} 호텔 {check_in} 체크인으로 {nights}박 잡아줘."),
            _t("ko", "{city}에서 {check_in}에 하룻밤 묵을 호텔 예약해줘.", nights=1),
            _t("ko", "{check_in} {city} 숙소 {nights}박 예약 부탁해."),
            _t("ko", "{city}에 {nights}박, {check_in} 체크인 호텔 방 잡아줘."),
            _t("ko", "{city} 호텔 방 {check_in}부터 {nights}일 밤 예약해."),
        ],
    ),
    Tool(
        "get_news", "Latest news headlines on a topic.",
        {"topic": {"type": "string"}, "limit": {"type": "integer"}},
        ["topic"],
        {"topic": {"en": ["technology", "football", "climate", "elections", "space"],
                   "ko": ["경제", "축구", "우주", "선거", "과학"]},
         "limit": {"*": [3, 5, 10]}},
        [
            _t("en", "What's the latest news about {topic}?"),
            _t("en", "Give me {limit} headlines on {topic}."),
            _t("en", "Any news on {topic} today?"),
            _t("en", "Show me the top {limit} {topic} stories."),
            _t("en", "What's happening in {topic}?"),
            _t("en", "Catch me up on {topic} news."),
            _t("ko", "{topic} 최신 뉴스 알려줘."),
            _t("ko", "{topic} 관련 헤드라인 {limit}개 보여줘."),
            _t("ko", "오늘 {topic} 소식 있어?"),
            _t("ko", "{topic} 뉴스 {limit}개만 골라줘."),
            _t("ko", "요즘 {topic} 쪽 뉴스 뭐 있어?"),
            _t("ko", "{topic} 기사 좀 찾아줘."),
        ],
    ),
    Tool(
        "set_lights", "Turn the lights in a room on or off, optionally at a brightness from 0 to 100.",
        {"room": {"type": "string"}, "on": {"type": "boolean"}, "brightness": {"type": "integer"}},
        ["room", "on"],
        {"room": {"en": ["bedroom", "living room", "kitchen", "office"], "ko": ["거실", "안방", "부엌", "서재"]},
         "brightness": {"*": [20, 40, 50, 75, 100]}},
        [
            _t("en", "Turn on the lights in the {room}.", on=True),
            _t("en", "Switch off the {room} lights.", on=False),
            _t("en", "Dim the {room} lights to {brightness} percent.", on=True),
            _t("en", "Lights off in the {room}, please.", on=False),
            _t("en", "Set the {room} lights to {brightness}% brightness.", on=True),
            _t("en", "It's dark in the {room}, put the lights on.", on=True),
            _t("ko", "{room} 불 켜줘.", on=True),
            _t("ko", "{room} 조명 꺼줘.", on=False),
            _t("ko", "{room} 조명 밝기 {brightness}%로 해줘.", on=True),
            _t("ko", "{room} 불 좀 꺼.", on=False),
            _t("ko", "{room} 전등 {brightness}퍼센트로 켜줘.", on=True),
            _t("ko", "{room} 너무 어두워, 불 켜줘.", on=True),
        ],
    ),
]
CATALOGUE: list[Tool] = TOOLS + UNSEEN_TOOLS  # every tool; TOOLS are the ones training sees
UNSEEN_NAMES = frozenset(t.name for t in UNSEEN_TOOLS)


# ---------------------------------------------------------------- multi-step and no-fit data

# What each tool does, for the no-fit answer ("none of the tools I have can ...").
CAPABILITIES: dict[str, dict[str, str]] = {
    "get_weather": {"en": "check the weather", "ko": "날씨 확인"},
    "convert_currency": {"en": "convert currencies", "ko": "환율 계산"},
    "set_alarm": {"en": "set alarms", "ko": "알람 설정"},
    "send_email": {"en": "send emails", "ko": "이메일 보내기"},
    "search_restaurants": {"en": "search for restaurants", "ko": "식당 검색"},
    "book_flight": {"en": "book flights", "ko": "항공편 예약"},
    "translate_text": {"en": "translate text", "ko": "번역"},
    "get_stock_price": {"en": "look up stock prices", "ko": "주가 조회"},
    "set_thermostat": {"en": "change the thermostat", "ko": "온도 조절"},
    "calculate_tip": {"en": "calculate tips", "ko": "팁 계산"},
    "play_music": {"en": "play music", "ko": "음악 재생"},
    "get_directions": {"en": "give directions", "ko": "길 안내"},
    "create_reminder": {"en": "create reminders", "ko": "리마인더 설정"},
}

# General requests no tool serves, with their answers; every third per language is test-only.
QUESTIONS: dict[str, list[tuple[str, str]]] = {
    "en": [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("How many days are in a week?", "A week has seven days."),
        ("What color do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
        ("Say hello!", "Hello! How can I help you today?"),
        ("What is 12 times 3?", "12 times 3 is 36."),
        ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun."),
        ("Thanks for your help.", "You're welcome! Let me know if you need anything else."),
        ("How many legs does a spider have?", "A spider has eight legs."),
        ("What is the boiling point of water in celsius?", "Water boils at 100 degrees Celsius at sea level."),
    ],
    "ko": [
        ("한국의 수도는 어디야?", "한국의 수도는 서울이에요."),
        ("일주일은 며칠이야?", "일주일은 7일이에요."),
        ("파란색과 노란색을 섞으면 무슨 색이야?", "파란색과 노란색을 섞으면 초록색이 돼요."),
        ("안녕!", "안녕하세요! 무엇을 도와드릴까요?"),
        ("12 곱하기 3은?", "12 곱하기 3은 36이에요."),
        ("태양에서 가장 가까운 행성은?", "태양에서 가장 가까운 행성은 수성이에요."),
        ("도와줘서 고마워.", "천만에요! 더 필요한 게 있으면 말씀해 주세요."),
        ("거미 다리는 몇 개야?", "거미는 다리가 여덟 개예요."),
        ("물은 섭씨 몇 도에서 끓어?", "물은 해수면에서 섭씨 100도에서 끓어요."),
    ],
}


def split_questions(lang: str, split: str) -> list[tuple[str, str]]:
    """Every third general question per language is test-only, as with the templates."""
    return [q for i, q in enumerate(QUESTIONS[lang]) if (i % 3 == 2) == (split == "test")]


Outcome = tuple[dict[str, Any], dict[str, str]]  # (the tool's result, the answer per language)

_CONDITIONS = {"sunny": "맑아요", "cloudy": "흐려요", "rain": "비가 와요"}
_MODES = {"driving": ("by car", "차로"), "walking": ("on foot", "걸어서"), "transit": ("by public transport", "대중교통으로")}
_RESTAURANTS = ["Golden Spoon", "Blue Door", "Casa Verde", "Little Garden", "Harbor Table", "Red Lantern"]
_TRACKS = ["Greatest Hits", "Live Session", "Acoustic Mix", "Top Songs"]


def _weather(a: dict[str, Any], rng: random.Random) -> Outcome:
    unit = a.get("unit", "celsius")
    temp = rng.randint(-5, 33) if unit == "celsius" else rng.randint(25, 92)
    cond = rng.choice(sorted(_CONDITIONS))
    sign = "°C" if unit == "celsius" else "°F"
    result = {"city": a["city"], "temperature": temp, "unit": unit, "condition": cond}
    return result, {"en": f"It is {temp}{sign} and {cond} in {a['city']} right now.",
                    "ko": f"지금 {a['city']} 날씨는 {temp}{sign}이고 {_CONDITIONS[cond]}."}


def _currency(a: dict[str, Any], rng: random.Random) -> Outcome:
    converted = round(a["amount"] * rng.uniform(0.2, 5.0), 2)
    result = {"amount": converted, "currency": a["to_currency"]}
    return result, {"en": f"{a['amount']} {a['from_currency']} is {converted} {a['to_currency']}.",
                    "ko": f"{a['amount']} {a['from_currency']}의 {a['to_currency']} 환산 금액은 {converted} {a['to_currency']}예요."}


def _alarm(a: dict[str, Any], rng: random.Random) -> Outcome:
    label = f" ({a['label']})" if "label" in a else ""
    return {"status": "ok", "time": a["time"]}, {"en": f"Done: your alarm is set for {a['time']}{label}.",
                                                  "ko": f"{a['time']}에 알람을 맞췄어요{label}."}


def _email(a: dict[str, Any], rng: random.Random) -> Outcome:
    result = {"status": "sent", "message_id": f"msg_{rng.randrange(16**6):06x}"}
    return result, {"en": f"I sent the email to {a['to']} with the subject \"{a['subject']}\".",
                    "ko": f"{a['to']}에게 '{a['subject']}' 제목으로 메일을 보냈어요."}


def _restaurants(a: dict[str, Any], rng: random.Random) -> Outcome:
    names = rng.sample(_RESTAURANTS, 2)
    return {"restaurants": names}, {"en": f"I found {names[0]} and {names[1]} for {a['cuisine']} in {a['city']}.",
                                    "ko": f"{a['city']}의 {a['cuisine']} 식당으로 {names[0]}, {names[1]} 두 곳을 찾았어요."}


def _flight(a: dict[str, Any], rng: random.Random) -> Outcome:
    code = "".join(rng.choice(string.ascii_uppercase) for _ in range(3)) + str(rng.randint(100, 999))
    return {"status": "booked", "confirmation": code}, {
        "en": f"Your flight from {a['origin']} to {a['destination']} on {a['date']} is booked. Confirmation: {code}.",
        "ko": f"{a['date']} {a['origin']}에서 {a['destination']} 가는 항공편을 예약했어요. 예약 번호: {code}."}


def _stock(a: dict[str, Any], rng: random.Random) -> Outcome:
    price = round(rng.uniform(50, 900), 2)
    return {"symbol": a["symbol"], "price": price, "currency": "USD"}, {
        "en": f"{a['symbol']} is trading at {price} USD.", "ko": f"{a['symbol']}의 현재 주가는 {price} 달러예요."}


def _thermostat(a: dict[str, Any], rng: random.Random) -> Outcome:
    room = a.get("room")
    return {"status": "ok", "temperature": a["temperature"]}, {
        "en": f"The {room or 'thermostat'} is now set to {a['temperature']}°C.",
        "ko": f"{room + ' ' if room else ''}온도를 {a['temperature']}도로 맞췄어요."}


def _tip(a: dict[str, Any], rng: random.Random) -> Outcome:
    tip = round(a["bill"] * a["percent"] / 100, 2)
    total = round(a["bill"] + tip, 2)
    return {"tip": tip, "total": total}, {
        "en": f"A {a['percent']}% tip on {a['bill']} is {tip}, so the total is {total}.",
        "ko": f"{a['bill']}의 {a['percent']}% 팁은 {tip}이고, 합계는 {total}예요."}


def _music(a: dict[str, Any], rng: random.Random) -> Outcome:
    track = rng.choice(_TRACKS)
    shuffle = " on shuffle" if a.get("shuffle") else ""
    return {"status": "playing", "playlist": f"{a['artist']} {track}"}, {
        "en": f"Now playing {a['artist']} {track}{shuffle}.", "ko": f"지금 {a['artist']} {track} 재생 중이에요."}


def _directions(a: dict[str, Any], rng: random.Random) -> Outcome:
    minutes, km = rng.randint(5, 90), round(rng.uniform(0.5, 30), 1)
    en_mode, ko_mode = _MODES[a["mode"]]
    return {"duration_min": minutes, "distance_km": km}, {
        "en": f"From {a['origin']} to {a['destination']} takes about {minutes} minutes {en_mode} ({km} km).",
        "ko": f"{a['origin']}에서 {a['destination']}까지 {ko_mode} 약 {minutes}분 걸려요 ({km}km)."}


def _reminder(a: dict[str, Any], rng: random.Random) -> Outcome:
    return {"status": "ok", "in_minutes": a["minutes"]}, {
        "en": f"OK, I will remind you to {a['text']} in {a['minutes']} minutes.",
        "ko": f"{a['minutes']}분 뒤에 '{a['text']}' 알려드릴게요."}


# A plausible result per tool and the answer that reports it (translate_text has none:
# a made-up translation would teach wrong text).
OUTCOMES: dict[str, Callable[[dict[str, Any], random.Random], Outcome]] = {
    "get_weather": _weather, "convert_currency": _currency, "set_alarm": _alarm, "send_email": _email,
    "search_restaurants": _restaurants, "book_flight": _flight, "get_stock_price": _stock,
    "set_thermostat": _thermostat, "calculate_tip": _tip, "play_music": _music,
    "get_directions": _directions, "create_reminder": _reminder,
}


def split_templates(tool: Tool, split: str) -> list[Template]:
    """Every third phrasing of each language is test-only; the rest train. A held-out
    tool (UNSEEN_TOOLS) has every phrasing in test and none in train."""
    if tool.name in UNSEEN_NAMES:
        return list(tool.templates) if split == "test" else []
    chosen = []
    for lang in ("en", "ko"):
        of_lang = [t for t in tool.templates if t.lang == lang]
        chosen += [t for i, t in enumerate(of_lang) if (i % 3 == 2) == (split == "test")]
    return chosen


def _value(tool: Tool, arg: str, lang: str, rng: random.Random) -> Value:
    pools = tool.pools[arg]
    return rng.choice(pools.get(lang) or pools["*"])


def _arguments(tool: Tool, template: Template, rng: random.Random) -> tuple[dict[str, Value], dict[str, Value]]:
    """(slot values for the request text, the call's arguments)."""
    values: dict[str, Value] = {}
    for slot in template.slots():
        values[slot] = _value(tool, slot, template.lang, rng)
        if tool.properties[slot]["type"] == "string" and slot in ("destination", "to_currency"):
            # No trip from Seoul to Seoul, no USD to USD.
            other = "origin" if slot == "destination" else "from_currency"
            while values[slot] == values.get(other):
                values[slot] = _value(tool, slot, template.lang, rng)
    arguments = {name: {**values, **template.fixed}[name] for name in tool.properties if name in {**values, **template.fixed}}
    return values, arguments


def _offer(
    tool: Tool | None, rng: random.Random, offered: int, leave_out: str | None = None, pool: Sequence[Tool] = TOOLS
) -> list[dict[str, Any]]:
    """`offered` tool specs from `pool` in random order: `tool` among them, `leave_out` never."""
    others = [t for t in pool if tool is None or t.name != tool.name]
    others = [t for t in others if t.name != leave_out]
    count = min(offered, len(pool) - (leave_out is not None)) - (tool is not None)
    tools = ([tool] if tool else []) + rng.sample(others, count)
    rng.shuffle(tools)
    return [t.spec() for t in tools]


def call_turn(name: str, arguments: Mapping[str, Any], call_id: str = "call_0") -> dict[str, Any]:
    """An assistant turn that makes one call, in OpenAI's shape."""
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": call_id, "type": "function",
                        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}],
    }


def make_example(tool: Tool, template: Template, rng: random.Random, offered: int) -> dict[str, Any]:
    """One call. A held-out tool is offered among others from the whole catalogue, so the
    training tools beside it are ones the model was taught to call."""
    unseen = tool.name in UNSEEN_NAMES
    values, arguments = _arguments(tool, template, rng)
    tools = _offer(tool, rng, offered, pool=CATALOGUE if unseen else TOOLS)
    return {
        "messages": [{"role": "user", "content": template.text.format(**values)}, call_turn(tool.name, arguments)],
        "tools": tools,
        "meta": {"lang": template.lang, "template": template.text, "kind": "call",
                 "split": "unseen_tools" if unseen else "seen_tools"},
    }


def make_multi_step(tool: Tool, template: Template, rng: random.Random, offered: int) -> dict[str, Any]:
    """Request, call, the tool's result, and the answer that reports it."""
    values, arguments = _arguments(tool, template, rng)
    tools = _offer(tool, rng, offered)
    result, answers = OUTCOMES[tool.name](arguments, rng)
    return {
        "messages": [
            {"role": "user", "content": template.text.format(**values)},
            call_turn(tool.name, arguments),
            {"role": "tool", "tool_call_id": "call_0", "content": json.dumps(result, ensure_ascii=False)},
            {"role": "assistant", "content": answers[template.lang]},
        ],
        "tools": tools,
        "meta": {"lang": template.lang, "template": template.text, "kind": "multi_step", "split": "multi_step"},
    }


def make_no_fit(index: int, split: str, rng: random.Random, offered: int) -> dict[str, Any]:
    """A request no offered tool serves; the answer is text. Even indexes: another
    tool's request with that tool left out (the answer says it cannot); odd: a general
    question (the answer answers it)."""
    if index % 2 == 0:
        tool = TOOLS[(index // 2) % len(TOOLS)]
        template = rng.choice(split_templates(tool, split))
        values, _ = _arguments(tool, template, rng)
        capability = CAPABILITIES[tool.name][template.lang]
        answer = (f"Sorry, none of the tools I have can {capability}." if template.lang == "en"
                  else f"죄송해요, 지금 쓸 수 있는 도구 중에는 {capability} 기능이 없어요.")
        request, lang, text = template.text.format(**values), template.lang, template.text
        tools = _offer(None, rng, offered, leave_out=tool.name)
    else:
        lang = ("en", "ko")[(index // 2) % 2]
        of_lang = split_questions(lang, split)
        request, answer = of_lang[(index // 4) % len(of_lang)]
        text = request
        tools = _offer(None, rng, offered)
    return {
        "messages": [{"role": "user", "content": request}, {"role": "assistant", "content": answer}],
        "tools": tools,
        "meta": {"lang": lang, "template": text, "kind": "no_fit", "split": "no_call"},
    }


MULTI_STEP, NO_FIT = 0.12, 0.12  # default shares of the two extra kinds
# The command line's share of held-out-tool lines in the test split. generate() and
# write_dataset() default to none, so their callers get the data they always did.
UNSEEN_SHARE = 0.2


def generate(
    split: str, n: int, seed: int = 0, offered: int = 4, multi_step: float = MULTI_STEP, no_fit: float = NO_FIT,
    unseen_tools: float = 0.0,
) -> list[dict[str, Any]]:
    """`n` examples: round(n * multi_step) multi-step ones, round(n * no_fit) no-fit ones,
    in the test split round(n * unseen_tools) calls of held-out tools (UNSEEN_TOOLS; the
    train split never has them), the rest single calls of training tools; each kind
    balanced over tools, the same for a given seed."""
    if min(multi_step, no_fit, unseen_tools) < 0 or multi_step + no_fit + unseen_tools > 1:
        raise ValueError("multi_step, no_fit and unseen_tools are shares: each >= 0, together <= 1")
    rng = random.Random(f"{seed}-{split}")
    n_multi, n_no_fit = round(n * multi_step), round(n * no_fit)
    n_unseen = round(n * unseen_tools) if split == "test" else 0
    examples = []
    for i in range(n - n_multi - n_no_fit - n_unseen):
        tool = TOOLS[i % len(TOOLS)]  # balanced over tools
        examples.append(make_example(tool, rng.choice(split_templates(tool, split)), rng, offered))
    with_outcome = [t for t in TOOLS if t.name in OUTCOMES]
    for i in range(n_multi):
        tool = with_outcome[i % len(with_outcome)]
        examples.append(make_multi_step(tool, rng.choice(split_templates(tool, split)), rng, offered))
    for i in range(n_no_fit):
        examples.append(make_no_fit(i, split, rng, offered))
    for i in range(n_unseen):  # drawn last: without them the other lines are what they always were
        tool, lang = UNSEEN_TOOLS[i % len(UNSEEN_TOOLS)], ("en", "ko")[i // len(UNSEEN_TOOLS) % 2]
        templates = [t for t in split_templates(tool, split) if t.lang == lang]  # both languages, evenly
        examples.append(make_example(tool, rng.choice(templates), rng, offered))
    rng.shuffle(examples)
    return examples


def preference_pairs(examples: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """DPO lines from generated examples, the mistake a tuned model still makes as rejected:
    a call: the same arguments sent to another offered tool; a no-fit request: a call
    where text was right; a multi-step answer: calling the tool again instead of answering."""
    rng = random.Random(seed)
    pairs = []
    for example in examples:
        answer = example["messages"][-1]
        names = [t["function"]["name"] for t in example["tools"]]
        if answer.get("tool_calls"):
            fn = answer["tool_calls"][0]["function"]
            wrong = rng.choice([name for name in names if name != fn["name"]])
            rejected = call_turn(wrong, json.loads(fn["arguments"]))
        elif len(example["messages"]) > 2:  # multi-step: the call again
            fn = example["messages"][-3]["tool_calls"][0]["function"]
            rejected = call_turn(fn["name"], json.loads(fn["arguments"]), "call_1")
        else:
            picked = rng.choice(names)
            tool = next(t for t in CATALOGUE if t.name == picked)
            template = rng.choice(tool.templates)
            rejected = call_turn(tool.name, _arguments(tool, template, rng)[1])
        pairs.append({"prompt": example["messages"][:-1], "chosen": answer, "rejected": rejected, "tools": example["tools"]})
    return pairs


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def write_dataset(
    out: Path, n_train: int, n_test: int, seed: int = 0, offered: int = 4,
    multi_step: float = MULTI_STEP, no_fit: float = NO_FIT, unseen_tools: float = 0.0,
) -> dict[str, Path]:
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    write_jsonl(paths["train"], generate("train", n_train, seed, offered, multi_step, no_fit))
    write_jsonl(paths["test"], generate("test", n_test, seed, offered, multi_step, no_fit, unseen_tools))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.datagen.function_calling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="dir for train.jsonl and test.jsonl")
    parser.add_argument("--train", type=int, default=600, help="training examples")
    parser.add_argument("--test", type=int, default=150, help="test examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--offered", type=int, default=4, help="tools offered per example (the right one included)")
    parser.add_argument("--multi-step", type=float, default=MULTI_STEP,
                        help=f"share of call, tool result, text answer examples [default: {MULTI_STEP}]")
    parser.add_argument("--no-fit", type=float, default=NO_FIT,
                        help=f"share of examples no offered tool fits (answer: text) [default: {NO_FIT}]")
    parser.add_argument("--unseen-tools", type=float, default=UNSEEN_SHARE,
                        help="share of test examples that call a tool training never sees, "
                        f"only its schema in the prompt [default: {UNSEEN_SHARE}]")
    args = parser.parse_args(argv)
    shares = (args.multi_step, args.no_fit, args.unseen_tools)
    if min(shares) < 0 or sum(shares) > 1:
        parser.error("--multi-step, --no-fit and --unseen-tools are shares: each >= 0, together <= 1")
    paths = write_dataset(args.out, args.train, args.test, args.seed, args.offered, args.multi_step, args.no_fit,
                          args.unseen_tools)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
