"""Synthetic function-calling data in English and Korean, split by template.

Each tool has typed arguments (JSON schema) and phrasings ("templates") in both
languages. Every third phrasing of each tool and language goes to the test split
only, so a test request never reuses a phrasing seen in training: the split
measures whether the model learned the task, not the sentences. Each example
offers the right tool among `offered` tools (the others drawn at random), and the
answer is the call as JSON: {"name": ..., "arguments": {...}}.

    python -m training.datagen.function_calling --out data/fc --train 600 --test 150
"""

from __future__ import annotations

import argparse
import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

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


def split_templates(tool: Tool, split: str) -> list[Template]:
    """Every third phrasing of each language is test-only; the rest train."""
    chosen = []
    for lang in ("en", "ko"):
        of_lang = [t for t in tool.templates if t.lang == lang]
        chosen += [t for i, t in enumerate(of_lang) if (i % 3 == 2) == (split == "test")]
    return chosen


def _value(tool: Tool, arg: str, lang: str, rng: random.Random) -> Value:
    pools = tool.pools[arg]
    return rng.choice(pools.get(lang) or pools["*"])


def make_example(tool: Tool, template: Template, rng: random.Random, offered: int) -> dict[str, Any]:
    values: dict[str, Value] = {}
    for slot in template.slots():
        values[slot] = _value(tool, slot, template.lang, rng)
        if tool.properties[slot]["type"] == "string" and slot in ("destination", "to_currency"):
            # No trip from Seoul to Seoul, no USD to USD.
            other = "origin" if slot == "destination" else "from_currency"
            while values[slot] == values.get(other):
                values[slot] = _value(tool, slot, template.lang, rng)
    arguments = {name: {**values, **template.fixed}[name] for name in tool.properties if name in {**values, **template.fixed}}
    others = [t for t in TOOLS if t.name != tool.name]
    tools = [tool, *rng.sample(others, min(offered, len(TOOLS)) - 1)]
    rng.shuffle(tools)
    call = json.dumps({"name": tool.name, "arguments": arguments}, ensure_ascii=False)
    return {
        "messages": [{"role": "user", "content": template.text.format(**values)}, {"role": "assistant", "content": call}],
        "tools": [t.spec() for t in tools],
        "meta": {"lang": template.lang, "template": template.text},
    }


def generate(split: str, n: int, seed: int = 0, offered: int = 4) -> list[dict[str, Any]]:
    rng = random.Random(f"{seed}-{split}")
    examples = []
    for i in range(n):
        tool = TOOLS[i % len(TOOLS)]  # balanced over tools
        examples.append(make_example(tool, rng.choice(split_templates(tool, split)), rng, offered))
    rng.shuffle(examples)
    return examples


def preference_pairs(examples: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """DPO lines from generated examples: chosen = the right call, rejected = the same
    arguments sent to another offered tool (the mistake a tuned model still makes)."""
    rng = random.Random(seed)
    pairs = []
    for example in examples:
        call = json.loads(example["messages"][-1]["content"])
        wrong = rng.choice([t["function"]["name"] for t in example["tools"] if t["function"]["name"] != call["name"]])
        pairs.append({
            "prompt": example["messages"][:-1],
            "chosen": example["messages"][-1]["content"],
            "rejected": json.dumps({"name": wrong, "arguments": call["arguments"]}, ensure_ascii=False),
            "tools": example["tools"],
        })
    return pairs


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def write_dataset(out: Path, n_train: int, n_test: int, seed: int = 0, offered: int = 4) -> dict[str, Path]:
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    write_jsonl(paths["train"], generate("train", n_train, seed, offered))
    write_jsonl(paths["test"], generate("test", n_test, seed, offered))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.datagen.function_calling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="dir for train.jsonl and test.jsonl")
    parser.add_argument("--train", type=int, default=600, help="training examples")
    parser.add_argument("--test", type=int, default=150, help="test examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--offered", type=int, default=4, help="tools offered per example (the right one included)")
    args = parser.parse_args(argv)
    for split, path in write_dataset(args.out, args.train, args.test, args.seed, args.offered).items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
